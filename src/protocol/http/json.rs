//! The JSON part of a v2 HTTP request, decoded in one pass straight into the serving core's
//! request model: no `serde_json::Value` tree. Tensor data goes directly into its typed
//! buffer; an input's name, datatype and shape are checked against the model as soon as
//! they are read, and the element count is bounded — by the declared shape once it is
//! known, by the model's largest request before — so no more is ever allocated than the
//! model could run.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::serving::prepare::{ModelInterface, check_input_header};
use crate::serving::{ApiError, DataType, InputData, ParamValue, Parameters};

/// Nesting allowed in a tensor's `data` (a flat list, or one level per dimension).
const MAX_DATA_DEPTH: usize = 8;
/// Dimensions allowed in a declared shape.
const MAX_SHAPE_DIMS: usize = 8;

/// One input as the JSON describes it; its data is either inline or in the binary section.
#[derive(Debug)]
pub struct JsonInput {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    pub parameters: Parameters,
    /// `None` when the data is in the binary section (`binary_data_size`).
    pub data: Option<InputData>,
}

/// One requested output as the JSON describes it.
#[derive(Debug, Default)]
pub struct JsonOutput {
    pub name: String,
    pub parameters: Parameters,
}

/// The JSON part of a request.
#[derive(Debug, Default)]
pub struct JsonRequest {
    pub id: Option<String>,
    pub parameters: Parameters,
    pub inputs: Vec<JsonInput>,
    pub outputs: Vec<JsonOutput>,
}

/// Decodes the JSON part of a request to `model`.
pub fn decode(json: &[u8], model: &ModelInterface) -> Result<JsonRequest, ApiError> {
    let refusal = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(json);
    let parsed =
        RequestSeed { model, refusal: &refusal }.deserialize(&mut de).and_then(|r| de.end().map(|()| r));
    match (parsed, refusal.into_inner()) {
        // A limit or check of ours stopped the parse: its own error, not serde's wording.
        (_, Some(refused)) => Err(refused),
        (Ok(req), None) => Ok(req),
        (Err(e), None) => Err(ApiError::BadRequest(format!("malformed JSON request: {e}"))),
    }
}

/// Keeps the first refusal of a check (a serde error then unwinds the parse).
fn refuse<E: de::Error>(slot: &RefCell<Option<ApiError>>, error: ApiError) -> E {
    let message = error.to_string();
    slot.borrow_mut().get_or_insert(error);
    E::custom(message)
}

struct RequestSeed<'a> {
    model: &'a ModelInterface,
    refusal: &'a RefCell<Option<ApiError>>,
}

impl<'de> DeserializeSeed<'de> for RequestSeed<'_> {
    type Value = JsonRequest;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<JsonRequest, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RequestSeed<'_> {
    type Value = JsonRequest;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object (a v2 inference request)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonRequest, A::Error> {
        let mut req = JsonRequest::default();
        let mut seen_inputs = false;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*key {
                "id" => req.id = map.next_value::<Option<String>>()?,
                "parameters" => {
                    req.parameters = map.next_value_seed(ParametersSeed { field: "parameters" })?
                }
                "inputs" => {
                    req.inputs =
                        map.next_value_seed(InputsSeed { model: self.model, refusal: self.refusal })?;
                    seen_inputs = true;
                }
                "outputs" => req.outputs = map.next_value_seed(OutputsSeed)?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if !seen_inputs {
            return Err(refuse(self.refusal, ApiError::BadRequest("the request has no `inputs`".into())));
        }
        Ok(req)
    }
}

struct InputsSeed<'a> {
    model: &'a ModelInterface,
    refusal: &'a RefCell<Option<ApiError>>,
}

impl<'de> DeserializeSeed<'de> for InputsSeed<'_> {
    type Value = Vec<JsonInput>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<JsonInput>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for InputsSeed<'_> {
    type Value = Vec<JsonInput>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("`inputs`: an array of input objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<JsonInput>, A::Error> {
        let mut inputs = Vec::new();
        // The model takes one input: a second is refused before its data is read.
        while let Some(input) = seq.next_element_seed(InputSeed {
            model: self.model,
            refusal: self.refusal,
            index: inputs.len(),
        })? {
            inputs.push(input);
        }
        Ok(inputs)
    }
}

struct InputSeed<'a> {
    model: &'a ModelInterface,
    refusal: &'a RefCell<Option<ApiError>>,
    index: usize,
}

impl<'de> DeserializeSeed<'de> for InputSeed<'_> {
    type Value = JsonInput;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<JsonInput, D::Error> {
        d.deserialize_map(self)
    }
}

impl InputSeed<'_> {
    /// The elements the data may hold: the declared count once name, datatype and shape
    /// passed the model's checks, else the most the model could take.
    fn data_limit<E: de::Error>(
        &self,
        name: &Option<String>,
        datatype: &Option<String>,
        shape: &Option<Vec<i64>>,
    ) -> Result<(usize, bool), E> {
        if let (Some(n), Some(d), Some(s)) = (name, datatype, shape) {
            let checked = check_input_header(self.model, n, d, s).map_err(|e| refuse(self.refusal, e))?;
            return Ok((checked.elements, true));
        }
        let most = match self.model.input_datatype {
            DataType::Bytes => self.model.limits.max_items,
            _ => self.model.limits.max_values(),
        };
        Ok((most, false))
    }
}

impl<'de> Visitor<'de> for InputSeed<'_> {
    type Value = JsonInput;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "`inputs[{}]`: an object", self.index)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonInput, A::Error> {
        if self.index > 0 {
            return Err(refuse(
                self.refusal,
                ApiError::BadRequest(format!(
                    "model `{}` takes one input (`{}`); the request has more",
                    self.model.name, self.model.input_name
                )),
            ));
        }
        let (mut name, mut datatype, mut shape) = (None::<String>, None::<String>, None::<Vec<i64>>);
        let mut parameters = Parameters::new();
        let mut data = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*key {
                "name" => name = Some(map.next_value()?),
                "datatype" => {
                    let d: String = map.next_value()?;
                    if d != self.model.input_datatype.name() {
                        let field =
                            name.as_deref().map_or("inputs[0]".to_string(), |n| format!("input `{n}`"));
                        return Err(refuse(
                            self.refusal,
                            ApiError::BadRequest(format!(
                                "{field}: datatype {d} given, the model expects {}",
                                self.model.input_datatype.name()
                            )),
                        ));
                    }
                    datatype = Some(d);
                }
                "shape" => shape = Some(map.next_value_seed(ShapeSeed)?),
                "parameters" => {
                    parameters = map.next_value_seed(ParametersSeed { field: "input parameters" })?
                }
                "data" => {
                    let (max, exact) = self.data_limit(&name, &datatype, &shape)?;
                    let mut sink = match self.model.input_datatype {
                        DataType::Bytes => Sink::Bytes(Vec::with_capacity(if exact { max } else { 0 })),
                        _ => Sink::F32(Vec::with_capacity(if exact { max } else { 0 })),
                    };
                    let field = name.as_deref().map_or("inputs[0]".to_string(), |n| format!("input `{n}`"));
                    map.next_value_seed(DataSeed {
                        sink: &mut sink,
                        max,
                        exact,
                        max_item_bytes: self.model.limits.max_image_bytes,
                        depth: 0,
                        field: &field,
                        refusal: self.refusal,
                    })?;
                    data = Some(match sink {
                        Sink::F32(v) => InputData::F32(v),
                        Sink::Bytes(v) => InputData::Bytes(v),
                    });
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let field = format!("inputs[{}]", self.index);
        let missing =
            |what: &str| refuse(self.refusal, ApiError::BadRequest(format!("{field}: missing `{what}`")));
        let name = name.ok_or_else(|| missing("name"))?;
        let datatype = datatype.ok_or_else(|| missing("datatype"))?;
        let shape = shape.ok_or_else(|| missing("shape"))?;
        Ok(JsonInput { name, datatype, shape, parameters, data })
    }
}

struct ShapeSeed;

impl<'de> DeserializeSeed<'de> for ShapeSeed {
    type Value = Vec<i64>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<i64>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ShapeSeed {
    type Value = Vec<i64>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "`shape`: an array of at most {MAX_SHAPE_DIMS} non-negative integers")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<i64>, A::Error> {
        let mut dims = Vec::new();
        while let Some(d) = seq.next_element::<u64>()? {
            if dims.len() == MAX_SHAPE_DIMS {
                return Err(de::Error::custom(format!("`shape` has more than {MAX_SHAPE_DIMS} dimensions")));
            }
            dims.push(i64::try_from(d).map_err(|_| de::Error::custom("`shape`: dimension too large"))?);
        }
        Ok(dims)
    }
}

/// Where tensor data goes.
enum Sink {
    F32(Vec<f32>),
    Bytes(Vec<Vec<u8>>),
}

impl Sink {
    fn len(&self) -> usize {
        match self {
            Sink::F32(v) => v.len(),
            Sink::Bytes(v) => v.len(),
        }
    }
}

/// Walks `data` (flat or nested arrays) and pushes every element into the sink, refusing the
/// element past `max` before it is stored.
struct DataSeed<'a, 'f> {
    sink: &'a mut Sink,
    max: usize,
    /// `max` is the declared count (not only the model's ceiling).
    exact: bool,
    max_item_bytes: usize,
    depth: usize,
    field: &'f str,
    refusal: &'f RefCell<Option<ApiError>>,
}

impl DataSeed<'_, '_> {
    fn room<E: de::Error>(&self) -> Result<(), E> {
        if self.sink.len() < self.max {
            return Ok(());
        }
        let error = if self.exact {
            ApiError::BadRequest(format!(
                "{}: more data elements than the shape's {} (the shape and data disagree)",
                self.field, self.max
            ))
        } else {
            ApiError::PayloadTooLarge(format!(
                "{}: more than {} data elements, the most this model takes in one request (max_batch_size × item)",
                self.field, self.max
            ))
        };
        Err(refuse(self.refusal, error))
    }

    fn number<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.room()?;
        match self.sink {
            Sink::F32(values) if self.depth > 0 => {
                values.push(v as f32);
                Ok(())
            }
            Sink::F32(_) => Err(E::custom(format!("{}: `data` must be an array", self.field))),
            Sink::Bytes(_) => Err(refuse(
                self.refusal,
                ApiError::BadRequest(format!(
                    "{}: numbers given for a BYTES tensor (strings expected)",
                    self.field
                )),
            )),
        }
    }

    fn string<E: de::Error>(self, s: &str) -> Result<(), E> {
        self.room()?;
        match self.sink {
            Sink::Bytes(items) if self.depth > 0 => {
                if s.len() > self.max_item_bytes {
                    return Err(refuse(
                        self.refusal,
                        ApiError::PayloadTooLarge(format!(
                            "{}: element {} has {} bytes; this model accepts at most {} (input.image.max_bytes)",
                            self.field,
                            items.len(),
                            s.len(),
                            self.max_item_bytes
                        )),
                    ));
                }
                items.push(s.as_bytes().to_vec());
                Ok(())
            }
            Sink::Bytes(_) => Err(E::custom(format!("{}: `data` must be an array", self.field))),
            Sink::F32(_) => Err(refuse(
                self.refusal,
                ApiError::BadRequest(format!(
                    "{}: element {} of `data` is not a number",
                    self.field,
                    self.sink.len()
                )),
            )),
        }
    }
}

impl<'de> DeserializeSeed<'de> for DataSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DataSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}: `data` as an array of numbers or strings", self.field)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth >= MAX_DATA_DEPTH {
            return Err(de::Error::custom(format!(
                "{}: `data` is nested more than {MAX_DATA_DEPTH} levels deep",
                self.field
            )));
        }
        let DataSeed { sink, max, exact, max_item_bytes, depth, field, refusal } = self;
        while seq
            .next_element_seed(DataSeed {
                sink: &mut *sink,
                max,
                exact,
                max_item_bytes,
                depth: depth + 1,
                field,
                refusal,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.number(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.number(v as f64)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.number(v as f64)
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<(), E> {
        self.string(s)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        let error = ApiError::BadRequest(format!(
            "{}: element {} of `data` is a boolean; the model's input is {}",
            self.field,
            self.sink.len(),
            match self.sink {
                Sink::F32(_) => "FP32",
                Sink::Bytes(_) => "BYTES",
            }
        ));
        Err(refuse(self.refusal, error))
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(format!("{}: element {} of `data` is null", self.field, self.sink.len())))
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(format!("{}: `data` holds an object", self.field)))
    }
}

/// A `parameters` object: bool, number or string values.
struct ParametersSeed {
    field: &'static str,
}

impl<'de> DeserializeSeed<'de> for ParametersSeed {
    type Value = Parameters;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Parameters, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ParametersSeed {
    type Value = Parameters;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "`{}`: an object of bool, number or string values", self.field)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Parameters, E> {
        Ok(Parameters::new())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Parameters, A::Error> {
        let mut out = Parameters::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(ParamSeed { field: self.field, key: &key })?;
            out.insert(key, value);
        }
        Ok(out)
    }
}

struct ParamSeed<'a> {
    field: &'static str,
    key: &'a str,
}

impl<'de> DeserializeSeed<'de> for ParamSeed<'_> {
    type Value = ParamValue;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<ParamValue, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ParamSeed<'_> {
    type Value = ParamValue;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "`{}.{}`: a bool, number or string", self.field, self.key)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<ParamValue, E> {
        Ok(ParamValue::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<ParamValue, E> {
        Ok(ParamValue::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<ParamValue, E> {
        Ok(i64::try_from(v).map_or(ParamValue::Double(v as f64), ParamValue::Int))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<ParamValue, E> {
        Ok(ParamValue::Double(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<ParamValue, E> {
        Ok(ParamValue::Str(v.to_string()))
    }
}

struct OutputsSeed;

impl<'de> DeserializeSeed<'de> for OutputsSeed {
    type Value = Vec<JsonOutput>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<JsonOutput>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for OutputsSeed {
    type Value = Vec<JsonOutput>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("`outputs`: an array of output objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<JsonOutput>, A::Error> {
        let mut outputs = Vec::new();
        while let Some(o) = seq.next_element_seed(OutputSeed { index: outputs.len() })? {
            outputs.push(o);
        }
        Ok(outputs)
    }
}

struct OutputSeed {
    index: usize,
}

impl<'de> DeserializeSeed<'de> for OutputSeed {
    type Value = JsonOutput;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<JsonOutput, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for OutputSeed {
    type Value = JsonOutput;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "`outputs[{}]`: an object", self.index)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonOutput, A::Error> {
        let mut name = None;
        let mut parameters = Parameters::new();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*key {
                "name" => name = Some(map.next_value::<String>()?),
                "parameters" => {
                    parameters = map.next_value_seed(ParametersSeed { field: "output parameters" })?
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let name =
            name.ok_or_else(|| de::Error::custom(format!("outputs[{}]: missing `name`", self.index)))?;
        Ok(JsonOutput { name, parameters })
    }
}
