"""`minifca explain`: one text shrinking layer by layer under FCA (the table of `minifca.explain`)."""
from __future__ import annotations

from ..explain import picture, print_picture
from ..fca import FCAConfig
from .common import add_json, emit, fca_from_args, load_model, texts_from
from .demo import DEMO_FCA_KEEP


def cmd_explain(args):
    model = load_model(args)
    fca = fca_from_args(args, model.config.num_hidden_layers) or FCAConfig(keep=DEMO_FCA_KEEP)
    pic = picture(model, texts_from([args.text])[0], fca, args.max_length)
    if not emit(pic, args.json):
        print_picture(pic)


def register(subparsers, parents):
    p = subparsers.add_parser("explain", parents=[parents["model"], parents["fca"]],
                              help="show one text shrinking layer by layer under FCA",
                              description="Prints, layer by layer, which tokens stay fine units and which merge "
                                          "into coarse units (with their weights). Default FCA: keep 0.5.")
    p.add_argument("text", help="the text to explain")
    add_json(p)
    p.set_defaults(func=cmd_explain)
