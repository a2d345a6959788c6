"""The one tar writer of the data tests: webdataset shards (img2dataset's and clip_benchmark's layouts)
made from (member name, bytes) pairs."""
import io
import tarfile


def write_tar(path, members, truncate=False):
  """Writes a tar of `members` [(name, bytes)] to `path` (str or Path, its folder must exist); with
  `truncate`, only its first half (an interrupted download)."""
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  data = buffer.getvalue()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2] if truncate else data)
