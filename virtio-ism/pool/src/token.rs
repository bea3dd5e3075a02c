// SPDX-License-Identifier: Apache-2.0
//! Minting of region tokens and pool gids from the kernel's random source.

use crate::session::{PoolError, Token};

/// A nonzero random 64-bit value. Tokens name regions host-wide, so they are never derived
/// from pids, indices or clocks: a VMM that knows some tokens learns nothing about others.
pub fn random_nonzero_u64() -> Result<u64, PoolError> {
    loop {
        let value = getrandom::u64().map_err(|e| {
            PoolError::CreateMemory(std::io::Error::other(format!(
                "Failed to read random bytes: {e}"
            )))
        })?;
        if value != 0 {
            return Ok(value);
        }
    }
}

/// A fresh token that `in_use` does not already name.
pub fn mint_token(in_use: impl Fn(Token) -> bool) -> Result<Token, PoolError> {
    loop {
        let token = Token(random_nonzero_u64()?);
        if !in_use(token) {
            return Ok(token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn test_tokens_are_nonzero_and_distinct() {
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            let token = mint_token(|t| seen.contains(&t)).unwrap();
            assert_ne!(token.0, 0);
            assert!(seen.insert(token));
        }
        // Sequential or pid-derived values would share their high bits.
        let high: HashSet<u64> = seen.iter().map(|t| t.0 >> 48).collect();
        assert!(
            high.len() > 500,
            "token high bits look non-random: {}",
            high.len()
        );
    }

    #[test]
    fn test_mint_token_skips_tokens_in_use() {
        let first = mint_token(|_| false).unwrap();
        let second = mint_token(|t| t == first).unwrap();
        assert_ne!(first, second);
    }
}
