def main() -> None:
    raise SystemExit("tandem: under construction")
