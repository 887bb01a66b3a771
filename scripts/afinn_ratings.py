"""Write the AFINN valence of each of the 171 emotion words that AFINN rates, as a ratings CSV for
`emovec geometry --ratings` (the lexicon stays in the `afinn` package: pip install afinn).

    python scripts/afinn_ratings.py > /tmp/afinn.csv
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python" / "emovec"))
import corpus  # noqa: E402  (torch-free, importable by path)


def main() -> None:
    from afinn import Afinn

    lexicon = Afinn()._dict
    print("word,valence")
    rated = [(word, lexicon[word]) for word in corpus.load_emotions() if word in lexicon]
    for word, value in rated:
        print(f"{word},{value}")
    print(f"{len(rated)} of 171 emotion words have an AFINN valence", file=sys.stderr)


if __name__ == "__main__":
    main()
