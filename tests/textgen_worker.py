"""Run by tests/test_distributed.py under torchrun (two CPU processes, gloo): an OpenAI-compatible generator asks
a local server for six chats, then for two of them again and one more; each process writes what it got back."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from helpers import distributed, textgen


def main(url: str, out: Path) -> None:
    rank, world_size = distributed.world()
    generator = textgen.OpenAICompatibleGenerator(url, "gpt-test", concurrency=2, cache=out / "replies.jsonl")
    chats = [[{"role": "user", "content": f"word{i}"}] for i in range(6)]
    replies = generator.generate(chats)
    again = generator.generate(chats[:2] + [[{"role": "user", "content": "word9"}]])
    (out / f"rank{rank}.json").write_text(json.dumps({"world_size": world_size, "replies": replies, "again": again,
                                                      "requests": generator.stats["requests"]}))
    distributed.barrier()  # and leaves the group as it exits (helpers.distributed.leave_group_at_exit)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
