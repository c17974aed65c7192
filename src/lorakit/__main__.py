from lorakit.cli.main import main

main()
