//! Block-wise transfer of request payloads (RFC 7959 Block1): the option value, the block size
//! that fits a datagram limit, and the assembly of one atomic transfer at a time.

use std::time::Duration;

use tokio::time::Instant;

/// The value of a Block1 / Block2 option: block number, more flag, size exponent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Block {
    pub num: u32,
    pub more: bool,
    pub szx: u8,
}

/// Largest SZX (1024-byte blocks); 7 is reserved.
const MAX_SZX: u8 = 6;

impl Block {
    /// Parses an option value (0 to 3 bytes); `None` for a malformed value or SZX 7.
    pub(super) fn parse(bytes: &[u8]) -> Option<Block> {
        if bytes.len() > 3 {
            return None;
        }
        let value = bytes.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
        let szx = (value & 0b111) as u8;
        (szx <= MAX_SZX).then_some(Block {
            num: value >> 4,
            more: value & 0b1000 != 0,
            szx,
        })
    }

    /// The option value in the fewest bytes.
    pub(super) fn to_bytes(self) -> Vec<u8> {
        let value = (self.num << 4) | (u32::from(self.more) << 3) | u32::from(self.szx);
        let bytes = value.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        bytes[skip..].to_vec()
    }

    pub(super) fn size(self) -> usize {
        1 << (usize::from(self.szx) + 4)
    }

    /// Offset of this block's first byte in the whole body.
    pub(super) fn offset(self) -> usize {
        (self.num as usize) << (usize::from(self.szx) + 4)
    }

    /// The largest SZX whose blocks are at most `bytes` long (`None` below 16 bytes).
    pub(super) fn szx_fitting(bytes: usize) -> Option<u8> {
        (0..=MAX_SZX).rev().find(|szx| 1usize << (szx + 4) <= bytes)
    }
}

/// What to answer to one block.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Step {
    /// 2.31 Continue: more blocks to come.
    Continue,
    /// The last block arrived: the whole body and the Content-Format of the first block.
    Complete { body: Vec<u8>, format: Option<u16> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum BlockError {
    /// 4.08: a block out of sequence, or no transfer in progress.
    #[error("block out of sequence")]
    Incomplete,
    /// 4.13: the body would exceed the limit.
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    /// 4.00: a non-final block of the wrong size.
    #[error("block payload does not match its size")]
    Malformed,
}

struct Transfer {
    target: String,
    format: Option<u16>,
    body: Vec<u8>,
    last_block_at: Instant,
}

/// One Block1 transfer at a time (the device has a single download buffer).
pub(super) struct Assembler {
    max_body: usize,
    current: Option<Transfer>,
}

impl Assembler {
    pub(super) fn new(max_body: usize) -> Self {
        Self {
            max_body,
            current: None,
        }
    }

    /// The transfer in progress and its target, if any.
    #[cfg(test)]
    pub(super) fn target(&self) -> Option<&str> {
        self.current.as_ref().map(|t| t.target.as_str())
    }

    /// Takes one block aimed at `target` (method and path). Block 0 starts a new transfer,
    /// replacing an unfinished one; later blocks must continue where the body ends (a block
    /// that repeats bytes already held is accepted again). The server may switch to smaller
    /// blocks mid-way: offsets, not numbers, are compared.
    pub(super) fn receive(
        &mut self,
        now: Instant,
        target: &str,
        format: Option<u16>,
        block: Block,
        payload: &[u8],
    ) -> Result<Step, BlockError> {
        if (block.more && payload.len() != block.size()) || payload.len() > block.size() {
            return Err(BlockError::Malformed);
        }
        if block.num == 0 {
            self.current = Some(Transfer {
                target: target.to_string(),
                format,
                body: Vec::new(),
                last_block_at: now,
            });
        }
        let Some(transfer) = self.current.as_mut().filter(|t| t.target == target) else {
            return Err(BlockError::Incomplete);
        };
        let offset = block.offset();
        let end = offset + payload.len();
        if offset > transfer.body.len() {
            return Err(BlockError::Incomplete);
        }
        if end > self.max_body {
            self.current = None;
            return Err(BlockError::TooLarge(self.max_body));
        }
        transfer.body.truncate(offset);
        transfer.body.extend_from_slice(payload);
        transfer.last_block_at = now;
        if block.more {
            return Ok(Step::Continue);
        }
        let Some(done) = self.current.take() else {
            return Err(BlockError::Incomplete);
        };
        Ok(Step::Complete {
            body: done.body,
            format: done.format,
        })
    }

    /// When the transfer in progress is abandoned, if one is.
    pub(super) fn deadline(&self, lifetime: Duration) -> Option<Instant> {
        self.current.as_ref().map(|t| t.last_block_at + lifetime)
    }

    /// Drops a transfer idle for `lifetime`; returns its target.
    pub(super) fn expire(&mut self, now: Instant, lifetime: Duration) -> Option<String> {
        if self
            .current
            .as_ref()
            .is_some_and(|t| now >= t.last_block_at + lifetime)
        {
            return self.current.take().map(|t| t.target);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(num: u32, more: bool, szx: u8) -> Block {
        Block { num, more, szx }
    }

    #[test]
    fn option_values_round_trip() {
        assert_eq!(Block::parse(&[]), Some(block(0, false, 0)));
        assert_eq!(Block::parse(&[0x0E]), Some(block(0, true, 6)));
        assert_eq!(Block::parse(&[0x1D]), Some(block(1, true, 5)));
        assert_eq!(Block::parse(&[0x01, 0x04]), Some(block(16, false, 4)));
        assert_eq!(Block::parse(&[0x07]), None, "SZX 7 is reserved");
        assert_eq!(Block::parse(&[1, 2, 3, 4]), None);
        for b in [
            block(0, true, 2),
            block(17, false, 6),
            block(70_000, true, 0),
        ] {
            assert_eq!(Block::parse(&b.to_bytes()), Some(b));
        }
        assert_eq!(block(0, false, 0).to_bytes(), Vec::<u8>::new());
        assert_eq!(block(3, true, 4).size(), 256);
        assert_eq!(block(3, true, 4).offset(), 768);
        assert_eq!(Block::szx_fitting(1024), Some(6));
        assert_eq!(Block::szx_fitting(280), Some(4));
        assert_eq!(Block::szx_fitting(5000), Some(6));
        assert_eq!(Block::szx_fitting(15), None);
    }

    #[test]
    fn blocks_assemble_in_order() {
        let now = Instant::now();
        let mut assembler = Assembler::new(1000);
        let body: Vec<u8> = (0..300u32).map(|b| b as u8).collect();
        assert_eq!(
            assembler.receive(now, "PUT /5/0/0", Some(42), block(0, true, 3), &body[..128]),
            Ok(Step::Continue)
        );
        assert_eq!(
            assembler.receive(now, "PUT /5/0/0", None, block(1, true, 3), &body[128..256]),
            Ok(Step::Continue)
        );
        // A block sent again (a new message ID, so not caught as a duplicate) is taken again.
        assert_eq!(
            assembler.receive(now, "PUT /5/0/0", None, block(1, true, 3), &body[128..256]),
            Ok(Step::Continue)
        );
        assert_eq!(assembler.target(), Some("PUT /5/0/0"));
        // The server switches to 32-byte blocks: block 8 of 32 bytes starts at 256.
        assert_eq!(
            assembler.receive(now, "PUT /5/0/0", None, block(8, false, 1), &body[256..288]),
            Ok(Step::Complete {
                body: body[..288].to_vec(),
                format: Some(42)
            })
        );
        assert_eq!(assembler.target(), None);
    }

    #[test]
    fn gaps_sizes_and_limits_are_refused() {
        let now = Instant::now();
        let mut assembler = Assembler::new(300);
        assert_eq!(
            assembler.receive(now, "PUT /5/0/0", None, block(1, true, 3), &[0; 128]),
            Err(BlockError::Incomplete),
            "no transfer started"
        );
        assembler
            .receive(now, "PUT /5/0/0", None, block(0, true, 3), &[0; 128])
            .unwrap();
        assert_eq!(
            assembler.receive(now, "PUT /5/0/0", None, block(2, true, 3), &[0; 128]),
            Err(BlockError::Incomplete),
            "block 1 is missing"
        );
        assert_eq!(
            assembler.receive(now, "PUT /3/0/14", None, block(1, true, 3), &[0; 128]),
            Err(BlockError::Incomplete),
            "another target"
        );
        assert_eq!(
            assembler.receive(now, "PUT /5/0/0", None, block(1, true, 3), &[0; 100]),
            Err(BlockError::Malformed)
        );
        assembler
            .receive(now, "PUT /5/0/0", None, block(1, true, 3), &[0; 128])
            .unwrap();
        assert_eq!(
            assembler.receive(now, "PUT /5/0/0", None, block(2, true, 3), &[0; 128]),
            Err(BlockError::TooLarge(300))
        );
        assert_eq!(assembler.target(), None, "an oversized transfer is dropped");
    }

    #[test]
    fn an_idle_transfer_expires() {
        let now = Instant::now();
        let lifetime = Duration::from_secs(247);
        let mut assembler = Assembler::new(1000);
        assembler
            .receive(now, "PUT /5/0/0", None, block(0, true, 3), &[0; 128])
            .unwrap();
        assert_eq!(assembler.deadline(lifetime), Some(now + lifetime));
        assert_eq!(
            assembler.expire(now + Duration::from_secs(10), lifetime),
            None
        );
        assert_eq!(
            assembler.expire(now + lifetime, lifetime),
            Some("PUT /5/0/0".to_string())
        );
        assert_eq!(assembler.deadline(lifetime), None);
    }
}
