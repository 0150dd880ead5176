from twotower.cli import main

raise SystemExit(main())
