from genxai.cli import main

main()
