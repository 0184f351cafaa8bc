"""The object store (content-addressed Part 10 files) and its SQLite index (DESIGN §5).

- `index`    peewee models of the patient/study/series/instance index, its migrations
- `objects`  content-addressed layout, atomic publish, SpoolFile, verified reads
- `filemeta` fast Part 10 preamble + file meta (group 0002) encoder
- `ingest`   `Store`: the one way an object enters the store (C-STORE and import)
- `verify`   scrub of every object (`pacsd verify`)
- `importer` `pacsd import PATH...`
"""
