import io
import tarfile

import pytest

from xception_pl.data.tar import tar_members, tar_samples

LONG = "class_" + "x" * 120 + "/n01440764_10026"


def python_tar(fmt: int, files: dict[str, bytes], directory: bool = False) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        if directory:
            tar.addfile(tarfile.TarInfo("somedir"))  # not a regular file: skipped
            tar.getmembers()[-1].type = tarfile.DIRTYPE
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reads_the_files_python_tarfile_writes_including_long_names(fmt):
    files = {"a/b.jpg": b"\xff\xd8" * 700, "a/b.cls": b"3", "c.jpg": b"", "p" * 90 + "/" + "d" * 60 + ".jpg": b"x" * 513}
    if fmt != tarfile.USTAR_FORMAT:
        files[LONG + ".jpg"] = b"long"
    assert dict(tar_members(io.BytesIO(python_tar(fmt, files)))) == files


def test_truncated_or_corrupt_tar_raises_read_error():
    data = python_tar(tarfile.PAX_FORMAT, {"a.jpg": b"y" * 3000, "b.jpg": b"z" * 10})
    with pytest.raises(tarfile.ReadError, match="truncated"):
        list(tar_members(io.BytesIO(data[:1500])))
    with pytest.raises(tarfile.ReadError, match="corrupt shard"):
        list(tar_members(io.BytesIO(b"\x01" * 512)))
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(tar_members(io.BytesIO(data[:148] + b"0000000\0" + data[156:])))


def test_shard_errors_go_to_the_handler_and_shards_stay_apart():
    errors = []
    good = python_tar(tarfile.USTAR_FORMAT, {"k.jpg": b"1"})
    sources = [{"url": "good", "stream": io.BytesIO(good)}, {"url": "bad", "stream": io.BytesIO(good[:600])},
               {"url": "again", "stream": io.BytesIO(good)}]
    files = list(tar_samples(sources, handler=lambda e: errors.append(e) or True))
    assert files == [{"fname": "k.jpg", "data": b"1", "__url__": "good"}, {},
                     {}, {"fname": "k.jpg", "data": b"1", "__url__": "again"}, {}]
    assert len(errors) == 1 and "bad" in errors[0].args
