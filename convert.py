"""Import an insightface recognition model as a checkpoint of ours, to evaluate, fine-tune and export it.

  python convert.py ms1mv3_arcface_r100_fp16/backbone.pth r100.ckpt
  python convert.py buffalo_l/w600k_r50.onnx w600k_r50.ckpt
  python convert.py model.pt vit_b.ckpt --network vit_b_dp005_mask_005

  python val.py --eval_url /data/eval --ckpt_url r100.ckpt
  python train.py --ckpt_url r100.ckpt --data_url my_faces ...    (backbone from the import, new head)
  python export.py --ckpt_file r100.ckpt --file_name r100 --file_format MINDIR   (AIR on Ascend for the 310)

SOURCE is one of
  * an arcface_torch PyTorch state dict (the published `backbone.pth`, or `model.pt` and
    `checkpoint_gpu_0.pt` from training; torch.save's zip format, torch >= 1.6) of r18, r34, r50, r100,
    r200, mbf (MobileFaceNet, blocks (1, 4, 6, 2), scale 2) or a ViT (vit_t ... vit_h; the weights do
    not show the number of attention heads: 8, as in all of insightface's ViTs). torch is not needed
    and nothing in the file runs: it is read with an allow-list unpickler (OrderedDict,
    torch._utils._rebuild_tensor_v2/_rebuild_parameter and the Float/Half/BFloat16/Double/Long/Int
    storages, nothing else) and every tensor is checked against the bytes behind it.
  * an insightface model-zoo ONNX file (`w600k_r50.onnx`, `glint360k_r100.onnx`, `w600k_mbf.onnx`, ...)
    whose graph maps onto one of our iresnets or mbf, BatchNorm folded into the convolutions or not.
    Other ONNX graphs are refused; they can still be evaluated as they are with
    `python eval_onnx.py --onnx_url FILE ...`.

The network (layout, width, embedding size) is read from the weights; --network confirms it, or for
a ViT picks one of the variants of that size (they differ only in drop path and masking, which
matter for fine-tuning). OUTPUT holds only the backbone, with the meta network/width/num_features
that val.py, export.py and train.py --ckpt_url read. Like our backbones, the imported
ones take RGB 112x112 crops normalised as (pixel - 127.5) / 127.5, which is what insightface's
models expect outside their graphs. The embeddings equal the source model's to float32 precision.
"""
import argparse
import sys

from src.cli import run_main


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SOURCE", help="PyTorch state dict (.pth/.pt) or ONNX model (.onnx)")
    parser.add_argument("output", metavar="OUTPUT.ckpt", help="checkpoint to write")
    parser.add_argument("--network", default=None, help="expected backbone (default: read from the weights)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from src.deploy.interop import convert

    model = convert(args.source, args.output, args.network)
    print(f"wrote {args.output}: {model.network} (width {model.width}, {model.num_features}-d embeddings) from "
          f"{args.source}; evaluate it with python val.py --ckpt_url {args.output} --eval_url EVAL_DIR")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
