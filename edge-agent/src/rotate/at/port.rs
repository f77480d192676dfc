//! Where the AT port comes from. The backend opens the port for each
//! operation and closes it afterwards: a module reset makes the device node
//! vanish and come back, and a descriptor held across that would point at a
//! dead device.

use std::io;
use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_serial::SerialPortBuilderExt;

/// A byte stream to a modem.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

/// Opens the AT port.
pub trait PortSource: Send + Sync {
    /// For messages: the device path.
    fn describe(&self) -> String;
    /// The device node exists (false while a USB modem re-enumerates).
    fn present(&self) -> bool;
    /// Open it. Must be called within a Tokio runtime.
    fn open(&self) -> io::Result<Box<dyn Transport>>;
}

/// A serial device node, opened with tokio-serial: 8N1, no flow control,
/// exclusive (a second opener, such as a stray ModemManager probe, gets
/// `EBUSY` instead of stealing answers).
pub struct SerialPath {
    pub path: PathBuf,
    pub baud: u32,
}

impl PortSource for SerialPath {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn present(&self) -> bool {
        // Follows symlinks: a /dev/serial/by-id name dangles while the
        // device is gone.
        self.path.exists()
    }

    fn open(&self) -> io::Result<Box<dyn Transport>> {
        let stream = tokio_serial::new(self.path.to_string_lossy(), self.baud)
            .data_bits(tokio_serial::DataBits::Eight)
            .parity(tokio_serial::Parity::None)
            .stop_bits(tokio_serial::StopBits::One)
            .flow_control(tokio_serial::FlowControl::None)
            .exclusive(true)
            .open_native_async()
            .map_err(io::Error::from)?;
        Ok(Box::new(stream))
    }
}
