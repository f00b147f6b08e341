"""Rebuild the bundled CIFAR-10 sample from the full data set, byte for byte.

    python sample/make_sample.py --data_dir=../shared/data/cifar-10-batches-py

Takes a stratified 2,000 of the 50,000 training images (of which data.py holds out 200 for
validation) and 500 of the 10,000 test images, and writes them as a gzipped .npz (no timestamps,
so the same input always gives the same bytes) with its md5 beside it.
"""

import argparse
import gzip
import io
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnn_compression import data  # noqa: E402

TRAIN_SAMPLE = 2000
TEST_SAMPLE = 500
SAMPLE_SEED = 7


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=None, help="cifar-10-batches-py folder or cifar-10-python.tar.gz")
    args = parser.parse_args()
    try:
        x_train, y_train, x_test, y_test, source = data.load_cifar10(args.data_dir)
    except data.DataError as error:
        sys.exit(f"make_sample.py: {error}")
    train = data.stratified_indices(y_train, TRAIN_SAMPLE, SAMPLE_SEED)
    test = data.stratified_indices(y_test, TEST_SAMPLE, SAMPLE_SEED)
    buffer = io.BytesIO()
    np.savez(buffer, x_train=x_train[train], y_train=y_train[train].astype(np.uint8),
             x_test=x_test[test], y_test=y_test[test].astype(np.uint8))
    payload = buffer.getvalue()
    temporary = data.SAMPLE_PATH + ".tmp"
    with open(temporary, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as handle:
        handle.write(payload)
    os.replace(temporary, data.SAMPLE_PATH)
    digest = data.file_md5(data.SAMPLE_PATH)
    with open(data.SAMPLE_MD5_PATH, "w") as handle:
        handle.write(f"{digest}  {os.path.basename(data.SAMPLE_PATH)}\n")
    print(f"wrote {data.SAMPLE_PATH} ({os.path.getsize(data.SAMPLE_PATH) / 1e6:.2f} MB, md5 {digest}) from {source}")


if __name__ == "__main__":
    main()
