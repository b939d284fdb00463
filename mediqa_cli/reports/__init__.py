"""Report writers of ``mediqa score`` (CSV / JSONL with journal, resume state and lock) and the
self-contained HTML report of ``mediqa report``."""
