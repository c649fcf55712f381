from atcache.cli import main

main()
