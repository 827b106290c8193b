"""What share of real text's tokens have ids below a cut-off (would a head over the lowest ids
only do?): the demo target's tokenizer over this repository's docs and code and the MT-Bench
questions.

    .venv/bin/python benchmarks/vocab_coverage.py
"""

import json
from pathlib import Path

from specchat.sources.registry import load_registry
from specchat.sources.resolve import materialize, parse_model_spec
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    path = materialize(parse_model_spec("demo", load_registry()), print)
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = [p.read_text() for p in sorted(ROOT.glob("docs/*.md")) + sorted(ROOT.glob("specchat/**/*.py"))]
    texts += [json.loads(line)["turns"][0] for line in (ROOT / "specchat/data/mt_bench.jsonl").open()]
    ids = [i for text in texts for i in tokenizer(text)["input_ids"]]
    print(f"{len(ids)} tokens; vocabulary {len(tokenizer)}")
    for cut in (16384, 32768, 65536, 98304):
        print(f"ids < {cut:6}: {sum(i < cut for i in ids) / len(ids):.1%}")


if __name__ == "__main__":
    main()
