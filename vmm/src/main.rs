fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("probe") => match kata_like_vmm::test_guest::probe() {
            Ok(r) => println!("{}", serde_json::to_string(&r).unwrap_or_default()),
            Err(e) => {
                eprintln!("probe failed: {e}");
                std::process::exit(1);
            }
        },
        _ => std::process::exit(2),
    }
}
