from qpipe.cli import main

main()
