"""Greedy CTC WER of a projector on the whole held-out sets: the bound on what the LLM reads.

Loads the packaged embedded model, puts the projector of a ``train-embedded`` checkpoint (e.g. the CTC stage's
``<work>/ctc.ckpt``) in its place when one is given, and decodes the CTC head greedily on the 32 held-out synthetic
ASR clips and the 10 real pocketsphinx clips, each encoded alone as at inference (the 8-clip probe that
``train-embedded`` logs moves by 0.03-0.15 between recipes: too coarse to choose between them). The checkpoint must
come from a recipe with the packaged model's projector shape; its vocabulary may differ (it is taken from the
checkpoint).

    .venv/bin/python scripts/ctc_probe.py                                  # the packaged head
    .venv/bin/python scripts/ctc_probe.py --checkpoint /work/exp/n1-work/ctc.ckpt --threads 2
    .venv/bin/python scripts/ctc_probe.py --checkpoint /work/exp/d2-work/joint.ckpt --generate   # + LLM transcripts
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a train-embedded checkpoint (ctc.ckpt, joint.ckpt, ...); default: the packaged head")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--generate", action="store_true",
                        help="also score the LLM's generated transcripts, with the checkpoint's LoRA matrices when it "
                             "has them (e.g. <work>/joint.ckpt)")
    args = parser.parse_args()
    if args.checkpoint is not None and not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file; pass a train-embedded checkpoint such as "
                     "<work>/ctc.ckpt")

    import torch

    from speechtrim.models.storage import load_speechlm
    from speechtrim.train.embedded import _held_out_probe
    from speechtrim.train.hearing import _load_trained

    torch.set_num_threads(args.threads)
    model = load_speechlm(Path(__file__).resolve().parent.parent / "speechtrim" / "weights" / "embedded", merge=False)
    if args.checkpoint is not None:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)["model"]
        projector = {name.removeprefix("projector."): value for name, value in state.items()
                     if name.startswith("projector.") and not name.startswith("projector.summary.")}
        if projector.get("vocab_ids") is None:
            parser.error(f"{args.checkpoint} holds no vocabulary projector (no projector.vocab_ids)")
        model.projector.vocab_ids = projector["vocab_ids"]  # its own vocabulary (e.g. --ctc-pieces, WordNet)
        if args.generate:  # the checkpoint's LoRA matrices, if it has any (the packaged ones otherwise)
            _load_trained(model, {name: value for name, value in state.items() if name.startswith("lora.")})
        missing, unexpected = model.projector.load_state_dict(projector, strict=False)
        missing = [name for name in missing if not name.startswith("summary.")]
        if missing or unexpected:
            parser.error(f"{args.checkpoint}: projector shapes differ from the packaged one (missing {missing}, "
                         f"unexpected {unexpected})")
    probe = _held_out_probe(model, None)
    scores = {**(probe() if args.generate else {}), **probe(ctc_only=True)}
    print(json.dumps({"checkpoint": str(args.checkpoint) if args.checkpoint else "packaged", **scores}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
