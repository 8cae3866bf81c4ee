//! Tests of the device state directory.
