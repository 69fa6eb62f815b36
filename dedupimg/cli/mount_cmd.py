"""`dedupimg mount`: registered on the app by import (see dedupimg/cli/main.py)."""
