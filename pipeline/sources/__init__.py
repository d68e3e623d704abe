"""Readers of published datasets as they are distributed (file formats, lookup services), usable
without a stage: they yield plain records, and the ingest stage turns them into candidate rows."""
