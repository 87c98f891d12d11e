"""`python -m gpt.export` (temporary shim during the move)."""

from gpt.interop.export import main

if __name__ == "__main__":
    main()
