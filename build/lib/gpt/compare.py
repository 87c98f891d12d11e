"""`python -m gpt.compare` (temporary shim during the move)."""

from gpt.runs.compare import main

if __name__ == "__main__":
    main()
