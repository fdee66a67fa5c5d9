"""LLM data curation (Gemini Embedding): synthetic queries, pair filtering and LLM-judged hard
negatives, each a resumable stage reading and writing the training JSONL format."""
from gembed.curate.filtering import filter_pairs
from gembed.curate.negatives import llm_negatives
from gembed.curate.prompts import Prompts, load_prompts
from gembed.curate.synthesize import synthesize

__all__ = ["Prompts", "filter_pairs", "llm_negatives", "load_prompts", "synthesize"]
