from specchat.cli.entry import main

main()
