"""--stage pt data preparation against SFT packing on the same text: tokens/s and row fill.

    python benchmarks/pretrain_packing.py [--repeat 4] [--model_max_length 4096] [--workers 1] [--json PATH]

The text is ../shared/data's C4 sample (300 web documents) and Wikipedia sample (30 long articles),
repeated `--repeat` times. Each mode runs `prepare_data` end to end into a fresh cache (read, tokenize,
lay out rows, write Arrow): pt per document (default), pt cross-document, and SFT with --packing True on
the same documents as Alpaca records (instruction empty, the document as the output; SFT truncates long
documents where pt splits them). The layout step alone (`pack_documents` / `pack_arrays` on ids already
tokenized) is timed too. Reads the real tokenizer; writes only to a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
from baichuan_finetune.data.collator import pack_arrays
from baichuan_finetune.data.encoding import encode_conversations
from baichuan_finetune.data.pretrain import encode_documents, pack_documents
from baichuan_finetune.data.preprocess import prepare_data
from baichuan_finetune.data.raw_text import iter_documents
from baichuan_finetune.data.records import read_records
from baichuan_finetune.options.arguments import DataArguments

import common

C4 = common.SHARED / "data" / "llamafactory_c4_demo.jsonl"
WIKI = common.SHARED / "data" / "llamafactory_wiki_demo.txt"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--model_max_length", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=1)
    common.add_json_argument(parser)
    args = parser.parse_args()
    for needed in (C4, WIKI, common.TOKENIZER):
        if not needed.exists():
            print(f"needs {needed}", file=sys.stderr)
            return 1
    report = common.Report(args)
    sp = spm.SentencePieceProcessor(model_file=str(common.TOKENIZER))
    texts = [t for path in (C4, WIKI) for _, t in iter_documents(str(path))] * args.repeat
    length = args.model_max_length
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = tmp / "docs.jsonl"
        raw.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
        alpaca = tmp / "docs_alpaca.jsonl"
        alpaca.write_text("".join(json.dumps({"instruction": "", "output": t}, ensure_ascii=False) + "\n"
                                  for t in texts), encoding="utf-8")
        modes = {
            "pt (per document)": (dict(data_path=str(raw)), "pt"),
            "pt --pt_cross_document": (dict(data_path=str(raw), pt_cross_document=True), "pt"),
            "sft --packing (same text)": (dict(data_path=str(alpaca), packing=True), "sft"),
        }
        for name, (options, stage) in modes.items():
            data_args = DataArguments(**options, data_cache_dir=str(tmp / name.replace(" ", "_")),
                                      preprocessing_num_workers=args.workers)
            start = time.perf_counter()
            prepared = prepare_data(data_args, sp, length, stage=stage)
            seconds = time.perf_counter() - start
            r = prepared.report
            trained = int(sum(prepared.train_dataset["length"]))
            results[name] = {"seconds": seconds, "tokens_in_rows": trained, "documents": r.examples,
                             "rows": r.packed_rows, "fill": r.efficiency.get("packing"),
                             "targets": r.supervised_tokens, "truncated": r.truncated, "split": r.split_documents}
            rows.append([name, r.examples, trained, r.supervised_tokens, r.packed_rows,
                         f"{100 * r.efficiency.get('packing', 0):.1f}%", f"{seconds:.2f}", f"{trained / seconds:,.0f}"])
        report.table(["mode", "documents", "tokens in rows", "targets", "rows", "fill", "seconds", "tokens/s"], rows,
                     title=f"prepare_data end to end ({len(texts)} documents, model_max_length {length}, "
                           f"{args.workers} tokenizing process(es))")

        # The layout step alone, on the same ids (tokenized once here, not timed).
        chunk = encode_documents(sp, texts)
        conversations = read_records(str(alpaca)).conversations
        sft = encode_conversations(sp, conversations, length)
        layout = []
        for name, fn, tokens in [
            ("pt pack_documents (per document)",
             lambda: pack_documents(chunk.input_ids, chunk.lengths, length), int(chunk.lengths.sum())),
            ("pt pack_documents (cross document)",
             lambda: pack_documents(chunk.input_ids, chunk.lengths, length, cross_document=True),
             int(chunk.lengths.sum())),
            ("sft pack_arrays", lambda: pack_arrays(sft.input_ids, sft.labels, sft.lengths, length),
             int(sft.lengths.sum())),
        ]:
            best = min(_timed(fn) for _ in range(3))
            results[name] = {"seconds": best, "tokens": tokens}
            layout.append([name, tokens, f"{best * 1000:.1f}", f"{tokens / best:,.0f}"])
        report.table(["layout step", "tokens", "ms (best of 3)", "tokens/s"], layout, title="rows from ids alone")
    report.finish(results=results)
    return 0


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    np.seterr(all="raise")
    sys.exit(main())
