//! The prost codec with one change: a request that fails to decode is the client's fault,
//! so it gets INVALID_ARGUMENT (naming the field, as prost's error does) instead of INTERNAL.

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstCodec;

/// Codec of the generated services (see build.rs).
#[derive(Debug, Clone, Default)]
pub struct ClientErrorCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Codec for ClientErrorCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = ClientErrorDecoder<<ProstCodec<T, U> as Codec>::Decoder>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ClientErrorDecoder(self.0.decoder())
    }
}

/// Wraps a decoder, turning its errors into INVALID_ARGUMENT.
#[derive(Debug)]
pub struct ClientErrorDecoder<D>(D);

impl<D: Decoder<Error = Status>> Decoder for ClientErrorDecoder<D> {
    type Item = D::Item;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        self.0
            .decode(buf)
            .map_err(|e| Status::invalid_argument(format!("malformed protobuf request: {}", e.message())))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
