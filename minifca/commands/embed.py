"""`minifca embed`: a file of texts -> a file of vectors (.npy, .parquet or .jsonl), in input order."""
from __future__ import annotations

from ..embedding import WRITERS, check_output, embed_file
from .common import add_cluster, add_json, emit, fca_from_args, int_at_least, load_model, runner_from_args


def cmd_embed(args):
    out = check_output(args.out)                                     # a bad suffix fails before the model loads
    model = load_model(args)
    fca = fca_from_args(args, model.config.num_hidden_layers)
    with runner_from_args(args) as runner:
        res = embed_file(model, args.input, out, column=args.column, fca=fca, batch_size=args.batch_size,
                         max_length=args.max_length, normalize=args.normalize, runner=runner)
    res.update(model=str(model.path), backend=model.backend, fca=None if fca is None else fca.to_dict())
    if not emit(res, args.json):
        print(f"wrote {res['texts']} embeddings [{res['texts']}, {res['dim']}] to {res['out']} in input order "
              f"({res['pooling']} pooling, {'unit length' if res['normalized'] else 'not normalized'}, "
              f"texts cut at {res['max_length']} tokens{', FCA' if fca else ''}); "
              f"{res['seconds']:.1f} s for the whole job, {res['texts_per_second']:.0f} texts/s")


def register(subparsers, parents):
    p = subparsers.add_parser("embed", parents=[parents["model"], parents["fca"]],
                              help="embed a file of texts into .npy, .parquet or .jsonl",
                              description="Sentence embeddings of every text of INPUT, written to OUT in input order "
                                          "(row i = text i). INPUT: one text per line (every line, blank ones "
                                          "included), or a .tsv/.parquet file with a text column (--column, else "
                                          "'sentence' or 'text'). OUT's suffix picks the format: "
                                          f"{', '.join(WRITERS)}. Texts are sorted by length and batched; "
                                          "sentence-transformers checkpoints are pooled, cut and normalised as "
                                          "their files say (modules.json, sentence_bert_config.json). A progress "
                                          "bar goes to stderr when it is a terminal.")
    p.add_argument("input", help="a text file (one per line), .tsv or .parquet")
    p.add_argument("-o", "--out", required=True, help=f"output file: {', '.join(WRITERS)}")
    p.add_argument("--column", default=None, help="the text column of a .tsv/.parquet input (default: sentence, text)")
    p.add_argument("--batch-size", type=int_at_least(1), default=32, help="texts per forward (default 32)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--normalize", dest="normalize", action="store_true", default=None,
                   help="unit-length vectors (default: as the checkpoint's modules.json says; off without one)")
    g.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="the pooled vectors as they are, even where the checkpoint lists a Normalize module")
    add_cluster(p)
    add_json(p)
    p.set_defaults(func=cmd_embed)
