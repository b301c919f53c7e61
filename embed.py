"""Embed face images with a trained model; compare two faces; search a gallery of identities.

The model is a checkpoint (file, or a training folder: its newest checkpoint; run as val.py runs it,
see --backend), a .mindir or an .onnx file. Faces are aligned 112x112 crops (files, or folders walked
recursively in sorted order; other sizes are resized), or photos aligned with five landmarks from
--landmarks FILE: CSV rows `image,x1,y1,...,x5,y5` (eyes, nose, mouth corners as in the
IJB/insightface template), align.py's faces.csv (one face per photo: align.py --largest) or a
JSON object {"image": [[x, y], ...5]}; relative image paths are relative to that file's folder.

An embedding is emb(face) + emb(flipped face), L2-normalised, as in evaluation: the dot product of
two rows is their cosine similarity.

  # EMB.npy (float32, one row per image) and EMB.txt (the image paths, in row order)
  python embed.py --model outputs/r100 --images faces/ --output emb.npy
  python embed.py --model arcface_r100.onnx --landmarks photos/landmarks.csv --output emb.npy

  # same person? the threshold comes from --threshold, or --calibration (the 10-fold protocol's
  # threshold on a .bin set), or an uncalibrated default (0.3)
  python embed.py --model outputs/r100 --compare a.jpg b.jpg --calibration /data/eval/lfw.bin
  python embed.py --model arcface_r100.onnx --compare person_a/ person_b/ --threshold 0.35

  # the best identities of a gallery (one sub-folder of faces per identity) for every query image
  python embed.py --model arcface_r100.onnx --images queries/ --search gallery/ --top_k 3 \\
      --gallery_cache gallery.npz

Unreadable or undecodable images are an error, or with --skip_bad a warning each and left out.
"""
import argparse
import sys

from src.cli import MODEL_OPTIONS, add_model_options, run_main


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint (.ckpt), training folder, .mindir or .onnx")
    inputs = parser.add_argument_group("faces")
    inputs.add_argument("--images", nargs="+", default=[], metavar="PATH",
                        help="aligned face images and/or folders of them (walked recursively)")
    inputs.add_argument("--landmarks", default=None, metavar="FILE",
                        help="CSV or JSON file of five landmarks per image: those images are aligned here; "
                             "without --images, all the images it lists are used")
    inputs.add_argument("--skip_bad", action="store_true",
                        help="leave out unreadable/undecodable images with a warning instead of stopping")
    modes = parser.add_argument_group("what to do (default: write embeddings to --output)")
    modes.add_argument("--output", default=None, metavar="EMB.npy",
                       help="embeddings file; the image paths go to EMB.txt beside it")
    modes.add_argument("--overwrite", action="store_true", help="replace existing output files")
    modes.add_argument("--compare", nargs=2, default=None, metavar=("A", "B"),
                       help="two images, or two folders (mean of their faces): print the cosine similarity "
                            "and same/different")
    modes.add_argument("--search", default=None, metavar="GALLERY_DIR",
                       help="gallery with one sub-folder of faces per identity: print the best identities "
                            "for every --images/--landmarks face")
    compare = parser.add_argument_group("--compare threshold")
    compare.add_argument("--threshold", type=float, default=None,
                         help="cosine similarity above which two faces are the same person")
    compare.add_argument("--calibration", default=None, metavar="SET.bin",
                         help="take the threshold of the 10-fold verification protocol on this .bin set")
    compare.add_argument("--nfolds", type=int, default=10, help="folds of the protocol (default: %(default)s)")
    search = parser.add_argument_group("--search")
    search.add_argument("--top_k", type=int, default=5, help="identities printed per query (default: %(default)s)")
    search.add_argument("--gallery_cache", default=None, metavar="FILE.npz",
                        help="keep the gallery's embeddings here and reuse those of unchanged images")
    add_model_options(parser, tuple(MODEL_OPTIONS))
    return parser


def check_options(args):
    """Combinations that would silently do something else than asked."""
    from src.errors import ArcFaceError
    mode = "--compare" if args.compare else "--search" if args.search else None
    wrong = [("--output", args.output and mode), ("--images", args.images and args.compare),
             ("--threshold", args.threshold is not None and not args.compare),
             ("--calibration", args.calibration and not args.compare),
             ("--gallery_cache", args.gallery_cache and not args.search)]
    for option, refused in wrong:
        if refused:
            raise ArcFaceError(f"{option} does not go with {mode or 'writing embeddings'} (see --help)")
    if args.top_k < 1:
        raise ArcFaceError(f"--top_k must be positive, got {args.top_k}")
    if args.threshold is not None and args.calibration:
        raise ArcFaceError("give --threshold or --calibration, not both")
    if not args.compare and not (args.images or args.landmarks):
        raise ArcFaceError("no faces given: pass --images and/or --landmarks")
    if not mode and not args.output:
        raise ArcFaceError("pass --output EMB.npy (or --compare / --search)")


def main(argv=None):
    args = build_parser().parse_args(argv)
    from src.evaluation import faces
    from src.evaluation.embedders import model_from_args

    check_options(args)
    landmarks = faces.read_landmarks(args.landmarks) if args.landmarks else None
    if args.compare:
        sides = [(path, faces.faces_of([path], landmarks)) for path in args.compare]
    else:
        queries = faces.faces_of(args.images, landmarks) if args.images else landmarks.faces
    if args.output:
        faces.check_outputs(args.output, args.overwrite)
    threshold = faces.given_threshold(args.threshold) if args.threshold is not None else None
    model = model_from_args(args, args.model, log=faces.warn_line)

    if args.compare:
        if args.calibration:
            threshold = faces.calibrated_threshold(model.embed, args.calibration, args.batch_size, args.nfolds)
        elif threshold is None:
            threshold = faces.default_threshold()
        cosine = faces.compare(model.embed, *sides, args.batch_size, args.skip_bad)
        print(f"{args.compare[0]} vs {args.compare[1]}: cosine {cosine:.5f} -> {faces.decision(cosine, threshold)} "
              f"(threshold {threshold.cosine:.5f}, {threshold.source})")
        return 0

    if args.search:
        identities, templates = faces.gallery_templates(model, args.search, args.batch_size, args.gallery_cache,
                                                        args.skip_bad)
    kept, embeddings = faces.embed_faces(model.embed, queries, args.batch_size, args.skip_bad)
    paths = [queries[i].path for i in kept]
    if args.search:
        order, scores = faces.search(embeddings, templates, args.top_k)
        for path, row, score in zip(paths, order, scores):
            print(f"{path}: " + ", ".join(f"{identities[k]} {s:.5f}" for k, s in zip(row, score)))
        return 0

    faces.save_embeddings(args.output, paths, embeddings)
    npy, txt = faces.output_files(args.output)
    skipped = f" ({len(queries) - len(paths)} image(s) skipped)" if len(paths) < len(queries) else ""
    print(f"wrote {len(paths)} embeddings of dimension {embeddings.shape[1]} to {npy}, their paths to {txt}{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
