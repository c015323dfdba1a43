from .cli import main

# Guarded: worker processes of a sweep's LocalCluster are spawned, and import the main module.
if __name__ == "__main__":
    main()
