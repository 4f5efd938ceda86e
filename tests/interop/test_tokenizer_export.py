"""Every kind of gigatrain tokenizer, saved with `save_pretrained`, is a tokenizer that
transformers' AutoTokenizer loads with no code of ours and that gives the ids the model was
trained on: [eot] + the text's tokens for a text as a document, the text's tokens without the
document start."""

import json

import numpy as np
import pytest
import tokenizers as hf
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from gigatrain.data import load_tokenizer, make_tokenizer, train_bpe

# Code, Unicode (accents, combining marks, emoji, CJK, "Ā", which ByteLevel writes for the NUL
# byte), runs of spaces, tabs, newlines, a no-break space, and the eot's text, which inside a
# document is text.
MIXED = ("def f(x):\n\tif x  >  0:\n\t\treturn x ** 2   # square\r\n\n\n"
         "Grüße, naïve café, e\u0301, Ā; 😀🚀 漢字とかな, 한국어 \u00a0 \u3000end\t\t \n"
         "<|endoftext|> </s> <s> in a document are text\n    ")
CORPUS = [MIXED * 3, "The quick brown fox jumps over the lazy dog. " * 30, "def g(y):\n    return y + 1\n" * 20]


def foreign_tokenizer() -> hf.Tokenizer:
    """A Llama-2-like tokenizer.json that is not gigatrain's: <s> and </s>, and a post-processor
    that starts each text with <s> (gigatrain's documents start with its eot, </s>, instead)."""
    tokenizer = hf.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=380, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", special_tokens=[("<s>", 0)])
    return tokenizer


@pytest.fixture(scope="module", params=["byte", "bpe", "json"])
def tokenizer(request, tmp_path_factory):
    if request.param == "byte":
        return make_tokenizer("byte")
    if request.param == "bpe":
        return train_bpe(CORPUS, vocab_size=400)
    path = tmp_path_factory.mktemp("foreign") / "tokenizer.json"
    foreign_tokenizer().save(str(path))
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    return tokenizer.save_pretrained(tmp_path_factory.mktemp("hf"), model_max_length=256)


def test_each_kind_is_the_kind_it_names(tokenizer):
    assert tokenizer.kind in ("byte", "bpe", "json")
    assert tokenizer.kind != "json" or tokenizer.hf.id_to_token(tokenizer.eot_id) == "</s>"


def test_auto_tokenizer_gives_the_trained_ids_with_and_without_the_document_start(tokenizer, exported):
    theirs = transformers.AutoTokenizer.from_pretrained(exported)
    document = tokenizer.encode_documents([MIXED], np.dtype(np.int64)).tolist()  # what prepare writes
    assert document[0] == tokenizer.eot_id and len(document) > 20
    assert theirs(MIXED)["input_ids"] == document
    assert theirs(MIXED, add_special_tokens=False)["input_ids"] == tokenizer.encode(MIXED)
    assert theirs.encode(MIXED) == document
    assert theirs.bos_token_id == theirs.eos_token_id == tokenizer.eot_id
    assert theirs.model_max_length == 256
    batch = theirs([MIXED, "a\n"])["input_ids"]  # a batch: each text its own document
    assert batch == [document, tokenizer.encode_documents(["a\n"], np.dtype(np.int64)).tolist()]


def test_decoding_round_trips(tokenizer, exported):
    theirs = transformers.AutoTokenizer.from_pretrained(exported)
    ids = theirs(MIXED)["input_ids"]
    assert theirs.decode(ids, skip_special_tokens=True) == MIXED
    assert theirs.decode(ids[1:]) == MIXED == tokenizer.decode(ids[1:])


def test_tokenizer_json_alone_starts_documents_and_loads_back_as_the_same_kind(tokenizer, exported):
    """tokenizers itself (what vLLM and others read) applies the document start too; and the
    exported folder is a tokenizer gigatrain loads (an imported model's data is prepared with it)."""
    # tokenizers matches special tokens written in a text (transformers is told not to: split_special_tokens).
    text = MIXED.replace("<|endoftext|>", "").replace("</s>", "").replace("<s>", "")
    file = hf.Tokenizer.from_file(str(exported / "tokenizer.json"))
    assert file.encode(text).ids == [tokenizer.eot_id] + tokenizer.encode(text)
    again = load_tokenizer(exported)
    assert (again.kind, again.eot_id, again.vocab_size) == (tokenizer.kind, tokenizer.eot_id, tokenizer.vocab_size)
    assert again.encode(MIXED) == tokenizer.encode(MIXED)


def test_tokenizer_config_states_the_document_start(tokenizer, exported):
    config = json.loads((exported / "tokenizer_config.json").read_text())
    eot = tokenizer.hf.id_to_token(tokenizer.eot_id)
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["add_bos_token"], config["eos_token"], config["add_eos_token"]) == \
        (eot, True, eot, False)
    assert config["split_special_tokens"] is True
