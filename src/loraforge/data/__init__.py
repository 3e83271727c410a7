"""Data: read files, convert records to conversations, render chat templates, tokenize with loss masks,
split, pack and batch."""

from loraforge.data.collate import batches, collate, pack
from loraforge.data.dataset import DataReport, Datasets, build_datasets
from loraforge.data.formats import FORMAT_FIELDS, Conversation, to_conversations
from loraforge.data.readers import DataError, Record, read_records
from loraforge.data.template import CHATML_TEMPLATE, TEMPLATES
from loraforge.data.tokenize import IGNORE_INDEX, Sample, SplitReport, prompt_ids, tokenize_conversations

__all__ = [
    "CHATML_TEMPLATE",
    "FORMAT_FIELDS",
    "IGNORE_INDEX",
    "TEMPLATES",
    "Conversation",
    "DataError",
    "DataReport",
    "Datasets",
    "Record",
    "Sample",
    "SplitReport",
    "batches",
    "build_datasets",
    "collate",
    "pack",
    "prompt_ids",
    "read_records",
    "to_conversations",
    "tokenize_conversations",
]
