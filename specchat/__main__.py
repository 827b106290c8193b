from specchat.cli.app import main

main()
