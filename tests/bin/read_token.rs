//! Tries to read a file and says whether it could: `READ` or `DENIED <reason>`. Uses
//! only std, so that it runs as another user (who cannot load libtorch from our home).

fn main() {
    let path = std::env::args().nth(1).expect("a path");
    match std::fs::read(&path) {
        Ok(_) => println!("READ"),
        Err(e) => println!("DENIED {e}"),
    }
}
