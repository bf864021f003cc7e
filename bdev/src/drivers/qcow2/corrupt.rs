//! Corruption found while the image is open: the overlap check before
//! every write to the file, and what a detected corruption does — one
//! `BLOCK_IMAGE_CORRUPTED` event, and on a writable image the fence (no
//! more writes, the node reads as read-only) and the header's corrupt bit.

use std::sync::atomic::Ordering;

use reactor::IoBuf;

use super::header::incompat;
use super::overlap::kind;
use super::state::Qcow2;
use crate::error::IoError;
use crate::io::IoFlags;

impl Qcow2 {
    /// The image found corrupt while writable: nothing reaches the file.
    pub(super) fn fenced(&self) -> bool {
        self.alarm.fenced.load(Ordering::Acquire)
    }

    /// Reports corrupt metadata found on the way (QEMU's
    /// qcow2_signal_corruption without a place): the request fails with EIO.
    pub(super) fn corrupt(&self, what: impl std::fmt::Display) -> IoError {
        self.signal_corruption(None, what.to_string());
        IoError::Io
    }

    /// Refuses a write of `len` bytes at `offset` that would land on
    /// metadata (but that of the kinds in `ignore`), raising the alarm;
    /// refuses every write once the image is fenced.
    pub(super) fn check_write(&self, offset: u64, len: u64, ignore: u16) -> Result<(), IoError> {
        if self.fenced() {
            return Err(IoError::Io);
        }
        let hit = self.overlaps.borrow().check(offset, len, ignore);
        match hit {
            None => Ok(()),
            Some(k) => {
                let msg = format!("Preventing invalid write on metadata (overlaps with {})", kind::name(k));
                self.signal_corruption(Some((offset, len)), msg);
                Err(IoError::Io)
            }
        }
    }

    /// Writes `buf` at `offset` of the file after the overlap check.
    pub(super) async fn write_checked(&self, offset: u64, buf: IoBuf, ignore: u16) -> Result<(), IoError> {
        self.check_write(offset, buf.len() as u64, ignore)?;
        self.file.write(offset, buf, IoFlags::NONE).await.1
    }

    /// Makes a corruption known, as QEMU does: once, as a
    /// `BLOCK_IMAGE_CORRUPTED` event; on a writable image also fatally —
    /// the image is fenced (no more writes, the node reads as read-only)
    /// and the header's corrupt bit is set, so QEMU and Spindle refuse to
    /// open it for writing until `qemu-img check -r` repairs it.
    fn signal_corruption(&self, place: Option<(u64, u64)>, msg: String) {
        let fatal = !self.read_only;
        if self.signaled.get() && (!fatal || self.fenced()) {
            tracing::debug!("qcow2: {}: further corruption: {msg}", self.alarm.node_name);
            return;
        }
        if fatal {
            tracing::error!(
                "qcow2: {}: Marking image as corrupt: {msg}; further corruption events will be suppressed",
                self.alarm.node_name
            );
        } else {
            tracing::error!(
                "qcow2: {}: Image is corrupt: {msg}; further non-fatal corruption events will be suppressed",
                self.alarm.node_name
            );
        }
        if let Some(events) = &self.alarm.events {
            let mut data = serde_json::json!({
                "device": "",
                "node-name": self.alarm.node_name,
                "msg": msg,
                "fatal": fatal,
            });
            if let Some((offset, size)) = place {
                data["offset"] = offset.into();
                data["size"] = size.into();
            }
            events("BLOCK_IMAGE_CORRUPTED", data);
        }
        self.signaled.set(true);
        if fatal {
            self.alarm.fenced.store(true, Ordering::Release);
            self.header.borrow_mut().incompatible |= incompat::CORRUPT;
            if let Some(me) = self.me.upgrade() {
                reactor::spawn_local(async move { me.write_corrupt_bit().await });
            }
        }
    }

    /// Sets the corrupt bit on disk (version 3 images; version 2 has no
    /// feature bits). Under the metadata lock, so a header write in flight
    /// cannot land after it.
    async fn write_corrupt_bit(&self) {
        let _g = self.lock.lock().await;
        let (version, bits) = {
            let h = self.header.borrow();
            (h.version, h.incompatible)
        };
        if version < 3 {
            return;
        }
        // The incompatible feature bits sit at byte 72 of the header.
        let res = self.file.write(72, IoBuf::from_slice(&bits.to_be_bytes()), IoFlags::NONE).await.1;
        let res = match res {
            Ok(()) => self.file.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            tracing::error!("qcow2: {}: setting the corrupt bit failed: {e}", self.alarm.node_name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::entry;
    use super::super::header::Header;
    use super::super::testing::{KIB, MIB, caches, new_disk, open, pattern, read, run, write};
    use super::*;

    #[test]
    fn a_write_onto_metadata_is_refused_and_fences_the_image() {
        let disk = new_disk(4 * MIB, 64 * KIB, 4);
        let d = disk.clone();
        run(async move {
            let o = open(&d, caches(8, 4)).await;
            let cs = 64 * KIB;
            write(&o.ch, 0, &pattern(0, 2 * cs as usize, 1)).await;
            o.q.flush().await.unwrap();
            // Guest cluster 1 now claims the refcount block's cluster.
            let (_, table, _) = o.q.l1_lookup(1).unwrap();
            let bogus = entry::data_entry(2 * cs);
            d.channel().write(table + 8, IoBuf::from_slice(&bogus.to_be_bytes()), IoFlags::NONE).await.1.unwrap();

            let o = open(&d, caches(8, 4)).await;
            assert_eq!(o.ch.write(cs, IoBuf::from_slice(&[7; 512]), IoFlags::NONE).await.1, Err(IoError::Io));
            assert!(o.q.fenced());
            assert_eq!(o.ch.write(0, IoBuf::from_slice(&[7; 512]), IoFlags::NONE).await.1, Err(IoError::Io), "fenced");
            assert_eq!(read(&o.ch, 0, 512).await, pattern(0, 512, 1), "reads go on");
            let events = o.events.lock().unwrap().clone();
            assert_eq!(events.len(), 1, "one event: {events:?}");
            let e = &events[0].1;
            assert_eq!(e["msg"], "Preventing invalid write on metadata (overlaps with refcount block)");
            assert_eq!(
                (e["offset"].as_u64(), e["size"].as_u64(), e["fatal"].as_bool()),
                (Some(2 * cs), Some(512), Some(true))
            );
            // The corrupt bit reaches the header.
            for _ in 0..100 {
                reactor::yield_now().await;
            }
            let head = d.channel().read(0, 4096).await.unwrap();
            let h = Header::parse(&head).unwrap();
            assert_ne!(h.incompatible & incompat::CORRUPT, 0);
        });
    }

    #[test]
    fn a_table_ignores_its_own_kind() {
        let disk = new_disk(4 * MIB, 64 * KIB, 4);
        run(async move {
            let o = open(&disk, caches(8, 4)).await;
            let cs = 64 * KIB;
            assert_eq!(o.q.check_write(2 * cs, 8, kind::REFCOUNT_BLOCK), Ok(()));
            assert_eq!(o.q.check_write(3 * cs, 8, kind::ACTIVE_L1), Ok(()));
            assert_eq!(o.q.check_write(4 * cs, cs, 0), Ok(()), "past the metadata");
            assert!(!o.q.fenced());
            assert_eq!(o.q.check_write(0, 8, kind::ACTIVE_L1), Err(IoError::Io));
            assert!(o.q.fenced());
        });
    }
}
