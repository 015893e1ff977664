//! The `pgtide` command-line tool (work in progress).

fn main() {
    eprintln!("pgtide: the CLI is not built yet");
    std::process::exit(2);
}
