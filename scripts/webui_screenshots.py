"""Write the README's pictures of the web UI: docs/webui-chat.png and docs/webui-runs.png.

    baichuan-tune sft                                  # the demo: a model and a run in outputs/sft-demo
    baichuan-tune ppo                                  # optional: an RL run beside it (the pictures: stopped at step 12)
    python scripts/webui_screenshots.py --model outputs/sft-demo --runs outputs --run sft-demo

Serves the UI from this process on a free loopback port, drives the system's Chromium with Playwright (as
tests/test_webui.py does), asks the questions given and opens the run. Needs `pip install -e ".[test]"`
and Debian's `chromium` (`fonts-noto-cjk` too, for Chinese text).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model folder, or 'default' for the built-in model")
    parser.add_argument("--runs", default="outputs", help="folder of training runs")
    parser.add_argument("--run", default=None, help="the run to show (default: the latest)")
    parser.add_argument("--prompts", nargs="+", default=["Who are you?"], help="the conversation's questions")
    parser.add_argument("--typing", default="What is the capital of Japan?", help="left in the message box")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--output_dir", default="docs", help="folder for webui-chat.png and webui-runs.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    return parser.parse_args(argv)


def start_server(model_dir: str, runs: Path):
    from baichuan_tune.checkpoint import load_model_and_tokenizer, resolve_model_path
    from baichuan_tune.server import BackgroundServer, create_app
    from baichuan_tune.webui import mount_ui

    path = resolve_model_path(model_dir)
    model, tokenizer = load_model_and_tokenizer(path, dtype="fp32", device="cpu")
    name = "default" if model_dir == "default" else Path(path).name
    app = create_app(model, tokenizer, name)
    mount_ui(app, model, runs)
    return BackgroundServer(app).start()


def chat(page, url: str, prompts: list[str], typing: str, max_tokens: int, out: Path) -> None:
    page.goto(f"{url}/ui/#chat")
    page.wait_for_selector("body[data-ready=true]")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", str(max_tokens))
    for done, prompt in enumerate(prompts, 1):
        page.fill("#prompt", prompt)
        page.click("#send")
        page.wait_for_function(f"() => document.querySelectorAll('.message.assistant[data-state=done]').length >= {done}",
                               timeout=300_000)
    page.fill("#prompt", typing)
    page.screenshot(path=str(out / "webui-chat.png"))


def runs_page(page, url: str, run: str | None, out: Path) -> None:
    page.goto(f"{url}/ui/#runs")
    page.wait_for_selector("#run-list li[data-name]")
    run = run or page.get_attribute("#run-list li[data-name]", "data-name")  # the list puts the latest first
    page.click(f"#run-list li[data-name='{run}']")
    chart = page.wait_for_selector("#run-detail .chart[data-title=Loss] svg")
    box = chart.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.5)  # show a step's values
    page.screenshot(path=str(out / "webui-runs.png"))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not args.chromium:
        sys.exit("no Chromium found: apt-get install chromium, or pass --chromium PATH")
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server = start_server(args.model, Path(args.runs))
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            chat(page, server.url, args.prompts, args.typing, args.max_tokens, out)
            runs_page(page, server.url, args.run, out)
            browser.close()
    finally:
        server.stop()
    print(f"wrote {out / 'webui-chat.png'} and {out / 'webui-runs.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
