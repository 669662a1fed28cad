"""Quality through a real server: `eval-needle` (needle in a haystack) and `eval-ruler` (RULER-style tasks)."""
