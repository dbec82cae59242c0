"""Ray job entry: ``ray job submit --working-dir . -- python jobs/transfer.py --load_model ...``."""
from sentdisc.recipes.transfer import main

if __name__ == "__main__":
    main()
