"""An ext4 image made with mkfs.ext4 -d, changed through a loop mount, snapshotted twice, both restored."""

from __future__ import annotations

import shutil

from dedupimg.ops.restore import restore
from dedupimg.ops.snapshot import take_snapshot
from tests.helpers import det_bytes, make_tree, sh, text_bytes


def test_ext4_image_two_versions(tmp_path, repo):
    tree = tmp_path / "tree"
    make_tree(tree, dirs=6, files=12, size=20_000, dense=50_000)
    image = tmp_path / "fs.img"
    sh("mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", tree, image, "48M")
    v1 = tmp_path / "v1.img"
    shutil.copyfile(image, v1)
    s1 = take_snapshot(repo, str(image), name="fs").record

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mount", "-o", "loop", image, mnt)
    try:
        shutil.rmtree(mnt / "dir2")
        (mnt / "dir0" / "file1.dat").unlink()
        (mnt / "new").mkdir()
        for i in range(10):
            (mnt / "new" / f"n{i}.txt").write_bytes(text_bytes(5000 + i, 40_000))
        with open(mnt / "dir3" / "file4.dat", "r+b") as f:
            f.seek(5000)
            f.write(det_bytes(77, 3000))
    finally:
        sh("umount", mnt)
    sh("e2fsck", "-fn", image)
    s2 = take_snapshot(repo, str(image), name="fs")
    assert s2.bytes_new < image.stat().st_size // 4  # most of the filesystem is unchanged

    out1, out2 = tmp_path / "r1.img", tmp_path / "r2.img"
    restore(repo, s1.hex_id, str(out1))
    restore(repo, "latest", str(out2), name="fs")
    assert out1.read_bytes() == v1.read_bytes()
    assert out2.read_bytes() == image.read_bytes()
    assert out1.read_bytes() != out2.read_bytes()
    sh("e2fsck", "-fn", out2)
    check = tmp_path / "check"
    check.mkdir()
    sh("mount", "-o", "loop,ro", out2, check)
    try:
        assert (check / "new" / "n3.txt").read_bytes() == text_bytes(5003, 40_000)
        assert not (check / "dir2").exists()
    finally:
        sh("umount", check)
