"""speechtrim.bench: the accuracy-vs-cost benchmark behind ``speechtrim bench``.

``runner`` times one clip (prefill, label scoring, greedy decode, KV-cache bytes), ``sweep`` runs every method x
target prefill-FLOPs reduction into a resumable JSONL file, ``report`` writes the markdown tables and the trade-off
plot, ``scaling`` runs the long-audio study, ``main`` holds the presets and the command's entry point, and
``merge_speed`` times the vectorised merge against the paper's loop.
"""
