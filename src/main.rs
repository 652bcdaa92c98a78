//! The `runnel` binary: everything lives in the library.

fn main() -> std::process::ExitCode {
    runnel::cli::main()
}
