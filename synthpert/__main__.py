from synthpert.cli import main

main()
