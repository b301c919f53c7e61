"""Embed face images with a trained model; compare two faces; search a gallery of identities.

The model is a checkpoint (file, or a training folder: its newest checkpoint; run as val.py runs it,
see --backend), a .mindir or an .onnx file. Faces are
- aligned 112x112 crops (files, or folders walked recursively in sorted order; other sizes are
  resized, with a warning),
- photos with --detect: the detector finds the faces and each is aligned (the largest of each
  photo, or every face with --all_faces),
- or photos aligned with five landmarks from --landmarks FILE: CSV rows `image,x1,y1,...,x5,y5`
  (eyes, nose, mouth corners as in the IJB/insightface template; each row is a face), align.py's
  faces.csv, or a JSON object {"image": [[x, y], ...5]}; relative image paths are relative to that
  file's folder.
All alignment is the ArcFace five-point similarity alignment the models are trained and evaluated on.

An embedding is emb(face) + emb(flipped face), L2-normalised, as in evaluation: the dot product of
two rows is their cosine similarity. Its quality is the norm of the mean of the two unnormalised
features (larger for clearer faces; --min_quality leaves out faces below a value).

  # EMB.npy (float32, one row per face), EMB.txt (the face names, in row order: the image path, or
  # path#k for the k-th face of an image that gives several) and EMB.quality.npy (float32)
  python embed.py --model outputs/r100 --images faces/ --output emb.npy
  python embed.py --model outputs/r100 --images holiday_photos/ --detect --all_faces --output emb.npy
  python embed.py --model arcface_r100.onnx --landmarks photos/landmarks.csv --output emb.npy

  # same person? The threshold comes from --threshold, or --calibration (the 10-fold protocol's
  # threshold on a .bin set), or the one a training run with --eval_url recorded (threshold.json beside
  # its best.ckpt) for its own checkpoints and their exports, or else an uncalibrated default (0.3,
  # with a warning)
  python embed.py --model outputs/r100 --compare a.jpg b.jpg --calibration /data/eval/lfw.bin
  python embed.py --model arcface_r100.onnx --compare person_a/ person_b/ --threshold 0.35

  # the best identities of a gallery (one sub-folder of faces per identity) for every query image;
  # `no match above T` when even the best is below the threshold
  python embed.py --model arcface_r100.onnx --images queries/ --search gallery/ --top_k 3 \\
      --gallery_cache gallery.npz

Unreadable or undecodable images, photos without a face and landmarks that cannot be a face in their
image are an error, or with --skip_bad a warning each and left out. A file name with a line break
cannot be listed one per line: it is refused the same way.
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
                        help="CSV or JSON file of five landmarks per face: those photos are aligned here; "
                             "without --images, all the faces it lists are used")
    inputs.add_argument("--detect", action="store_true",
                        help="the images are photos: find the faces (MTCNN) and align them; the largest face of "
                             "each photo (gallery photos too)")
    inputs.add_argument("--all_faces", action="store_true",
                        help="with --detect: every face of each --images photo, named PATH#0, PATH#1, ... when "
                             "a photo has several (largest first)")
    inputs.add_argument("--skip_bad", action="store_true",
                        help="leave out unreadable/undecodable images, photos without a face and impossible "
                             "landmarks with a warning instead of stopping")
    inputs.add_argument("--min_quality", type=float, default=None, metavar="Q",
                        help="leave out faces whose quality (the feature norm written to EMB.quality.npy) is "
                             "below Q, with a note each")
    modes = parser.add_argument_group("what to do (default: write embeddings to --output)")
    modes.add_argument("--output", default=None, metavar="EMB.npy",
                       help="embeddings file; the face names go to EMB.txt and their qualities to "
                            "EMB.quality.npy beside it")
    modes.add_argument("--overwrite", action="store_true",
                       help="replace existing output files (and a --gallery_cache file that is not a gallery cache)")
    modes.add_argument("--compare", nargs=2, default=None, metavar=("A", "B"),
                       help="two images, or two folders (mean of their faces): print the cosine similarity "
                            "and same/different")
    modes.add_argument("--search", default=None, metavar="GALLERY_DIR",
                       help="gallery with one sub-folder of faces per identity: print the best identities "
                            "for every --images/--landmarks face, or `no match` below the threshold")
    compare = parser.add_argument_group("threshold of --compare and --search (default: recorded by the model's "
                                        "training run, else uncalibrated)")
    compare.add_argument("--threshold", type=float, default=None,
                         help="cosine similarity above which two faces are the same person")
    compare.add_argument("--calibration", default=None, metavar="SET.bin",
                         help="take the threshold of the 10-fold verification protocol on this .bin set")
    compare.add_argument("--nfolds", type=int, default=10, help="folds of the protocol (default: %(default)s)")
    search = parser.add_argument_group("--search")
    search.add_argument("--top_k", type=int, default=5, help="identities printed per query (default: %(default)s)")
    search.add_argument("--gallery_cache", default=None, metavar="FILE.npz",
                        help="keep the gallery's embeddings here (outside the gallery and query folders) and "
                             "reuse those of unchanged images; a cache that does not hold what it should is rebuilt")
    add_model_options(parser, tuple(MODEL_OPTIONS))
    return parser


def check_options(args):
    """Combinations that would silently do something else than asked."""
    from src.errors import ArcFaceError
    mode = "--compare" if args.compare else "--search" if args.search else None
    wrong = [("--output", args.output and mode), ("--images", args.images and args.compare),
             ("--threshold", args.threshold is not None and not mode),
             ("--calibration", args.calibration and not mode),
             ("--gallery_cache", args.gallery_cache and not args.search),
             ("--all_faces", args.all_faces and args.compare), ("--landmarks", args.landmarks and args.detect)]
    for option, refused in wrong:
        if refused:
            other = "--detect" if option == "--landmarks" else mode or "writing embeddings"
            raise ArcFaceError(f"{option} does not go with {other} (see --help)")
    if args.all_faces and not args.detect:
        raise ArcFaceError("--all_faces needs --detect (faces found in photos)")
    if args.top_k < 1:
        raise ArcFaceError(f"--top_k must be positive, got {args.top_k}")
    if args.min_quality is not None and not args.min_quality >= 0:
        raise ArcFaceError(f"--min_quality must be a number >= 0, got {args.min_quality}")
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
        sides = [(path, faces.listable(faces.faces_of([path], landmarks), args.skip_bad)) for path in args.compare]
    else:
        queries = faces.listable(faces.faces_of(args.images, landmarks) if args.images else landmarks.faces,
                                 args.skip_bad)
    if args.output:
        faces.check_outputs(args.output, args.overwrite)
    if args.search:
        gallery = faces.open_gallery(args.search)
    if args.gallery_cache:
        faces.check_gallery_cache(args.gallery_cache, args.overwrite, args.search, args.images)
    if args.threshold is not None:
        faces.given_threshold(args.threshold)
    model = model_from_args(args, args.model, log=faces.warn_line)
    threshold = None
    if args.compare or args.search:
        threshold = faces.decision_threshold(args.threshold, args.calibration, args.model, model, args.batch_size,
                                             args.nfolds)

    if args.compare:
        if args.detect:
            sides = [(name, faces.detect_faces(side, skip_bad=args.skip_bad)) for name, side in sides]
        cosine = faces.compare(model.embed, *sides, args.batch_size, args.skip_bad, min_quality=args.min_quality)
        names = " vs ".join(faces.shown(path) for path in args.compare)
        print(f"{names}: cosine {cosine:.5f} -> {faces.decision(cosine, threshold)} "
              f"(threshold {threshold.cosine:.5f}, {threshold.source})")
        return 0

    if args.search:
        identities, templates = faces.gallery_templates(
            model, gallery, args.batch_size, args.gallery_cache, args.skip_bad, detect=args.detect,
            min_quality=args.min_quality, overwrite=args.overwrite)
    if args.detect:
        queries = faces.detect_faces(queries, args.all_faces, args.skip_bad)
    names, embeddings, quality = faces.embed_named(model.embed, queries, args.batch_size, args.skip_bad,
                                                   args.min_quality)
    if args.search:
        faces.warn_if_collapsed(templates)
        order, scores = faces.search(embeddings, templates, args.top_k)
        if threshold.calibrated and args.threshold is None:
            faces.warn_line(f"note: `no match` below the threshold {threshold.cosine:.5f} ({threshold.source})")
        for name, row, score in zip(names, order, scores):
            print(faces.search_line(name, identities, row, score, threshold))
        return 0

    faces.save_embeddings(args.output, names, embeddings, quality)
    npy, txt, quality_npy = faces.output_files(args.output)
    skipped = f" ({len(queries) - len(names)} face(s) left out)" if len(names) < len(queries) else ""
    print(f"wrote {len(names)} embeddings of dimension {embeddings.shape[1]} to {npy}, their names to {txt} and "
          f"qualities to {quality_npy}{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
