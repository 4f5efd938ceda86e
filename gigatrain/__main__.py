from gigatrain.cli import main

main()
