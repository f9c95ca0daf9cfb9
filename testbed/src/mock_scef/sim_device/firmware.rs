//! The simulator's firmware package format and its integrity check: `SIMFW1`, the package
//! name and version (each a length byte and UTF-8), the image, then the CRC-32 (IEEE 802.3,
//! big-endian) of everything before it. Firmware Update State and Update Result values
//! (LwM2M Core §E.6).

const MAGIC: &[u8] = b"SIMFW1";

/// /5/0/3 State.
pub(super) const STATE_IDLE: i64 = 0;
pub(super) const STATE_DOWNLOADING: i64 = 1;
pub(super) const STATE_DOWNLOADED: i64 = 2;
pub(super) const STATE_UPDATING: i64 = 3;

/// /5/0/5 Update Result.
pub(super) const RESULT_INITIAL: i64 = 0;
pub(super) const RESULT_SUCCESS: i64 = 1;
pub(super) const RESULT_NOT_ENOUGH_FLASH: i64 = 2;
pub(super) const RESULT_CONNECTION_LOST: i64 = 4;
pub(super) const RESULT_INTEGRITY_FAILURE: i64 = 5;
pub(super) const RESULT_UNSUPPORTED_PACKAGE: i64 = 6;
pub(super) const RESULT_UNSUPPORTED_PROTOCOL: i64 = 9;

/// What a verified package holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Package {
    pub name: String,
    pub version: String,
    pub image_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum PackageError {
    #[error("not a simulator firmware package")]
    Unsupported,
    #[error("checksum mismatch")]
    Integrity,
}

impl PackageError {
    /// The Update Result the failure leaves in /5/0/5.
    pub(super) fn update_result(self) -> i64 {
        match self {
            PackageError::Unsupported => RESULT_UNSUPPORTED_PACKAGE,
            PackageError::Integrity => RESULT_INTEGRITY_FAILURE,
        }
    }
}

/// Builds a package the simulated device accepts (names and versions longer than 255 bytes
/// are cut).
pub fn package(name: &str, version: &str, image: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    for field in [name, version] {
        let bytes = &field.as_bytes()[..field.len().min(255)];
        out.push(bytes.len() as u8);
        out.extend_from_slice(bytes);
    }
    out.extend_from_slice(image);
    let crc = crc32(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// Checks a downloaded package.
pub(super) fn verify(bytes: &[u8]) -> Result<Package, PackageError> {
    let rest = bytes.strip_prefix(MAGIC).ok_or(PackageError::Unsupported)?;
    let (name, rest) = field(rest).ok_or(PackageError::Unsupported)?;
    let (version, rest) = field(rest).ok_or(PackageError::Unsupported)?;
    let image_bytes = rest.len().checked_sub(4).ok_or(PackageError::Unsupported)?;
    let (covered, crc) = bytes.split_at(bytes.len() - 4);
    if crc32(covered).to_be_bytes() != crc {
        return Err(PackageError::Integrity);
    }
    Ok(Package {
        name,
        version,
        image_bytes,
    })
}

fn field(bytes: &[u8]) -> Option<(String, &[u8])> {
    let (length, rest) = bytes.split_first()?;
    let length = usize::from(*length);
    let text = std::str::from_utf8(rest.get(..length)?).ok()?;
    Some((text.to_string(), rest.get(length..)?))
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320).
pub(super) fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn packages_verify_and_corruption_is_caught() {
        let image = vec![0x5a; 700];
        let good = package("sim-fw", "2.0.0", &image);
        assert_eq!(
            verify(&good),
            Ok(Package {
                name: "sim-fw".into(),
                version: "2.0.0".into(),
                image_bytes: 700
            })
        );
        let mut corrupt = good.clone();
        corrupt[100] ^= 0x01;
        assert_eq!(verify(&corrupt), Err(PackageError::Integrity));
        assert_eq!(verify(b"firmware.bin"), Err(PackageError::Unsupported));
        assert_eq!(verify(&good[..10]), Err(PackageError::Unsupported));
        assert_eq!(
            PackageError::Integrity.update_result(),
            RESULT_INTEGRITY_FAILURE
        );
    }
}
