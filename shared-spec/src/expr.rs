//! Value expressions: what a feature aggregates, such as `amount`, `min(amount, 1000)` or
//! `utc_date(ts)`.
//!
//! The grammar is small on purpose: numbers, event fields, `+ - * /`, parentheses and a handful
//! of functions. Every layer evaluates it the same way: the reference evaluator and the speed
//! layer with [`Expr::eval`], the batch layer by translating it into a DataFusion expression.

use std::fmt;

use crate::duration::DAY_MS;
use crate::event::Event;

/// A field of the event schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// `event_id`: text.
    EventId,
    /// `user_id`: text.
    UserId,
    /// `event_type`: text.
    EventType,
    /// `amount`: a nullable number.
    Amount,
    /// `ts`: the event time.
    Ts,
}

impl serde::Serialize for Field {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl Field {
    /// Every field, in schema order.
    pub const ALL: [Field; 5] = [
        Field::EventId,
        Field::UserId,
        Field::EventType,
        Field::Amount,
        Field::Ts,
    ];

    /// The field's name in events and specs.
    pub fn name(self) -> &'static str {
        match self {
            Field::EventId => "event_id",
            Field::UserId => "user_id",
            Field::EventType => "event_type",
            Field::Amount => "amount",
            Field::Ts => "ts",
        }
    }

    /// The field called `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The type of the field's values.
    pub fn ty(self) -> Type {
        match self {
            Field::EventId | Field::UserId | Field::EventType => Type::Text,
            Field::Amount => Type::Number,
            Field::Ts => Type::Timestamp,
        }
    }
}

/// The type of an expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    /// A 64-bit float (integers are represented exactly up to 2^53).
    Number,
    /// UTF-8 text.
    Text,
    /// An instant; usable only through `utc_date` and `utc_hour`.
    Timestamp,
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Type::Number => "a number",
            Type::Text => "text",
            Type::Timestamp => "a timestamp",
        })
    }
}

/// A built-in function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Func {
    /// The smallest of its (two or more) numeric arguments; null if any is null.
    Min,
    /// The largest of its (two or more) numeric arguments; null if any is null.
    Max,
    /// The absolute value.
    Abs,
    /// The first non-null argument.
    Coalesce,
    /// The UTC calendar date of a timestamp, as whole days since 1970-01-01.
    UtcDate,
    /// The UTC hour of day (0-23) of a timestamp.
    UtcHour,
}

impl Func {
    const ALL: [Func; 6] = [
        Func::Min,
        Func::Max,
        Func::Abs,
        Func::Coalesce,
        Func::UtcDate,
        Func::UtcHour,
    ];

    /// The function's name in expressions.
    pub fn name(self) -> &'static str {
        match self {
            Func::Min => "min",
            Func::Max => "max",
            Func::Abs => "abs",
            Func::Coalesce => "coalesce",
            Func::UtcDate => "utc_date",
            Func::UtcHour => "utc_hour",
        }
    }
}

/// A binary arithmetic operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinOp {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/` (division by zero gives null)
    Div,
}

impl BinOp {
    fn symbol(self) -> char {
        match self {
            BinOp::Add => '+',
            BinOp::Sub => '-',
            BinOp::Mul => '*',
            BinOp::Div => '/',
        }
    }
}

/// A parsed, type-checked value expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A numeric literal.
    Number(f64),
    /// An event field.
    Field(Field),
    /// A function call.
    Call(Func, Vec<Expr>),
    /// Arithmetic on two numbers.
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// Negation.
    Neg(Box<Expr>),
}

/// The value of an expression for one event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scalar<'a> {
    /// No value (a null field, or an undefined operation such as division by zero).
    Null,
    /// A number.
    Number(f64),
    /// Text.
    Text(&'a str),
    /// An instant in epoch milliseconds.
    Timestamp(i64),
}

impl Scalar<'_> {
    /// The number held, or `None` for null and non-numbers.
    pub fn as_f64(self) -> Option<f64> {
        match self {
            Scalar::Number(x) => Some(x),
            _ => None,
        }
    }
}

/// A parse or type error at a byte offset of the expression text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExprError {
    /// Byte offset into the expression text.
    pub offset: usize,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl Expr {
    /// Parses and type-checks `text`.
    pub fn parse(text: &str) -> Result<Expr, ExprError> {
        let mut p = Parser { text, pos: 0 };
        p.skip_ws();
        if p.pos == text.len() {
            return Err(p.error("the expression is empty: write a field such as `amount`"));
        }
        let e = p.expr()?;
        p.skip_ws();
        if p.pos != text.len() {
            return Err(p.error(&format!(
                "unexpected `{}` after a complete expression",
                &text[p.pos..]
            )));
        }
        e.ty().map_err(|message| ExprError { offset: 0, message })?;
        Ok(e)
    }

    /// The type of the expression's values, or why it is ill-typed.
    pub fn ty(&self) -> Result<Type, String> {
        match self {
            Expr::Number(_) => Ok(Type::Number),
            Expr::Field(f) => Ok(f.ty()),
            Expr::Neg(e) => expect(e, Type::Number, "`-`").map(|_| Type::Number),
            Expr::Binary(op, l, r) => {
                let what = format!("`{}`", op.symbol());
                expect(l, Type::Number, &what)?;
                expect(r, Type::Number, &what)?;
                Ok(Type::Number)
            }
            Expr::Call(func, args) => {
                let what = format!("`{}`", func.name());
                let arity_ok = match func {
                    Func::Min | Func::Max | Func::Coalesce => args.len() >= 2,
                    Func::Abs | Func::UtcDate | Func::UtcHour => args.len() == 1,
                };
                if !arity_ok {
                    let wanted = match func {
                        Func::Min | Func::Max | Func::Coalesce => "two or more arguments",
                        _ => "exactly one argument",
                    };
                    return Err(format!(
                        "{what} takes {wanted}, not {}: for example `min(amount, 1000)` or `utc_date(ts)`",
                        args.len()
                    ));
                }
                let arg_ty = match func {
                    Func::UtcDate | Func::UtcHour => Type::Timestamp,
                    Func::Coalesce => args[0].ty()?,
                    _ => Type::Number,
                };
                for a in args {
                    expect(a, arg_ty, &what)?;
                }
                Ok(match func {
                    Func::Coalesce => arg_ty,
                    _ => Type::Number,
                })
            }
        }
    }

    /// The event fields the expression reads.
    pub fn fields(&self) -> Vec<Field> {
        let mut out = Vec::new();
        self.collect_fields(&mut out);
        out
    }

    fn collect_fields(&self, out: &mut Vec<Field>) {
        match self {
            Expr::Number(_) => {}
            Expr::Field(f) => {
                if !out.contains(f) {
                    out.push(*f)
                }
            }
            Expr::Neg(e) => e.collect_fields(out),
            Expr::Binary(_, l, r) => {
                l.collect_fields(out);
                r.collect_fields(out);
            }
            Expr::Call(_, args) => args.iter().for_each(|a| a.collect_fields(out)),
        }
    }

    /// Evaluates the expression on one event.
    pub fn eval<'a>(&self, event: &'a Event) -> Scalar<'a> {
        match self {
            Expr::Number(x) => Scalar::Number(*x),
            Expr::Field(f) => match f {
                Field::EventId => Scalar::Text(&event.event_id),
                Field::UserId => Scalar::Text(&event.user_id),
                Field::EventType => Scalar::Text(&event.event_type),
                Field::Amount => event.amount.map_or(Scalar::Null, Scalar::Number),
                Field::Ts => Scalar::Timestamp(event.ts),
            },
            Expr::Neg(e) => num(e.eval(event)).map_or(Scalar::Null, |x| Scalar::Number(-x)),
            Expr::Binary(op, l, r) => match (num(l.eval(event)), num(r.eval(event))) {
                (Some(a), Some(b)) => match op {
                    BinOp::Add => Scalar::Number(a + b),
                    BinOp::Sub => Scalar::Number(a - b),
                    BinOp::Mul => Scalar::Number(a * b),
                    BinOp::Div if b == 0.0 => Scalar::Null,
                    BinOp::Div => Scalar::Number(a / b),
                },
                _ => Scalar::Null,
            },
            Expr::Call(func, args) => match func {
                Func::Min | Func::Max => {
                    let mut acc: Option<f64> = None;
                    for a in args {
                        let Some(x) = num(a.eval(event)) else {
                            return Scalar::Null;
                        };
                        acc = Some(match acc {
                            None => x,
                            Some(y) if *func == Func::Min => y.min(x),
                            Some(y) => y.max(x),
                        });
                    }
                    acc.map_or(Scalar::Null, Scalar::Number)
                }
                Func::Abs => {
                    num(args[0].eval(event)).map_or(Scalar::Null, |x| Scalar::Number(x.abs()))
                }
                Func::Coalesce => args
                    .iter()
                    .map(|a| a.eval(event))
                    .find(|s| *s != Scalar::Null)
                    .unwrap_or(Scalar::Null),
                Func::UtcDate => match args[0].eval(event) {
                    Scalar::Timestamp(t) => Scalar::Number(t.div_euclid(DAY_MS) as f64),
                    _ => Scalar::Null,
                },
                Func::UtcHour => match args[0].eval(event) {
                    Scalar::Timestamp(t) => {
                        Scalar::Number((t.rem_euclid(DAY_MS) / crate::duration::HOUR_MS) as f64)
                    }
                    _ => Scalar::Null,
                },
            },
        }
    }
}

fn num(s: Scalar<'_>) -> Option<f64> {
    s.as_f64()
}

fn expect(e: &Expr, want: Type, what: &str) -> Result<(), String> {
    let got = e.ty()?;
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "{what} needs {want}, but `{e}` is {got}{}",
            if got == Type::Timestamp {
                ": use `utc_date(ts)` or `utc_hour(ts)`"
            } else {
                ""
            }
        ))
    }
}

impl fmt::Display for Expr {
    /// Prints the expression in canonical form; parsing the output gives the same expression.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Number(x) => write!(f, "{x}"),
            Expr::Field(field) => f.write_str(field.name()),
            Expr::Neg(e) => write!(f, "-({e})"),
            Expr::Binary(op, l, r) => write!(f, "({l} {} {r})", op.symbol()),
            Expr::Call(func, args) => {
                write!(f, "{}(", func.name())?;
                for (i, a) in args.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{a}")?;
                }
                f.write_str(")")
            }
        }
    }
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, message: &str) -> ExprError {
        ExprError {
            offset: self.pos,
            message: message.to_string(),
        }
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        self.skip_ws();
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expr(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.term()?;
        loop {
            let op = if self.eat(b'+') {
                BinOp::Add
            } else if self.eat(b'-') {
                BinOp::Sub
            } else {
                return Ok(left);
            };
            let right = self.term()?;
            left = Expr::Binary(op, Box::new(left), Box::new(right));
        }
    }

    fn term(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.unary()?;
        loop {
            let op = if self.eat(b'*') {
                BinOp::Mul
            } else if self.eat(b'/') {
                BinOp::Div
            } else {
                return Ok(left);
            };
            let right = self.unary()?;
            left = Expr::Binary(op, Box::new(left), Box::new(right));
        }
    }

    fn unary(&mut self) -> Result<Expr, ExprError> {
        if self.eat(b'-') {
            return Ok(Expr::Neg(Box::new(self.unary()?)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, ExprError> {
        self.skip_ws();
        let start = self.pos;
        match self.peek() {
            Some(b'(') => {
                self.pos += 1;
                let e = self.expr()?;
                if !self.eat(b')') {
                    return Err(self.error("missing `)`: close the parenthesis"));
                }
                Ok(e)
            }
            Some(c) if c.is_ascii_digit() || c == b'.' => {
                while let Some(c) = self.peek() {
                    let exponent_sign = (c == b'+' || c == b'-')
                        && matches!(self.text.as_bytes().get(self.pos - 1), Some(b'e' | b'E'));
                    if !(c.is_ascii_digit() || c == b'.' || c == b'e' || c == b'E' || exponent_sign)
                    {
                        break;
                    }
                    self.pos += 1;
                }
                let lit = &self.text[start..self.pos];
                lit.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .map(Expr::Number)
                    .ok_or_else(|| ExprError {
                        offset: start,
                        message: format!("`{lit}` is not a number"),
                    })
            }
            Some(c) if c.is_ascii_alphabetic() || c == b'_' => {
                while self
                    .peek()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_')
                {
                    self.pos += 1;
                }
                let name = &self.text[start..self.pos];
                if self.eat(b'(') {
                    let func = Func::ALL
                        .into_iter()
                        .find(|f| f.name() == name)
                        .ok_or_else(|| ExprError {
                            offset: start,
                            message: format!(
                                "unknown function `{name}`: use one of {}",
                                Func::ALL.map(|f| f.name()).join(", ")
                            ),
                        })?;
                    let mut args = Vec::new();
                    if !self.eat(b')') {
                        loop {
                            args.push(self.expr()?);
                            if self.eat(b')') {
                                break;
                            }
                            if !self.eat(b',') {
                                return Err(self.error("expected `,` or `)` in the argument list"));
                            }
                        }
                    }
                    Ok(Expr::Call(func, args))
                } else {
                    Field::from_name(name)
                        .map(Expr::Field)
                        .ok_or_else(|| ExprError {
                            offset: start,
                            message: format!(
                                "unknown field `{name}`: events have {}",
                                Field::ALL.map(|f| f.name()).join(", ")
                            ),
                        })
                }
            }
            Some(_) => Err(self.error(&format!(
                "unexpected `{}`: expected a number, a field or a function call",
                &self.text[self.pos..]
            ))),
            None => Err(self.error("the expression ends too early")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(amount: Option<f64>) -> Event {
        Event {
            event_id: "e1".into(),
            user_id: "u1".into(),
            event_type: "purchase".into(),
            amount,
            ts: 3 * DAY_MS + 5 * crate::duration::HOUR_MS,
        }
    }

    #[test]
    fn evaluates() {
        let e = ev(Some(1500.0));
        let x = |s: &str| Expr::parse(s).unwrap().eval(&e);
        assert_eq!(x("min(amount, 1000)"), Scalar::Number(1000.0));
        assert_eq!(x("amount * 2 - 1"), Scalar::Number(2999.0));
        assert_eq!(x("-amount"), Scalar::Number(-1500.0));
        assert_eq!(x("utc_date(ts)"), Scalar::Number(3.0));
        assert_eq!(x("utc_hour(ts)"), Scalar::Number(5.0));
        assert_eq!(x("amount / 0"), Scalar::Null);
        assert_eq!(x("event_type"), Scalar::Text("purchase"));
        let none = ev(None);
        assert_eq!(
            Expr::parse("min(amount, 1000)").unwrap().eval(&none),
            Scalar::Null
        );
        assert_eq!(
            Expr::parse("coalesce(amount, 0)").unwrap().eval(&none),
            Scalar::Number(0.0)
        );
    }

    #[test]
    fn round_trips_through_display() {
        for s in [
            "min(amount, 1000)",
            "(amount + 1) * 2",
            "utc_date(ts)",
            "-amount / 3",
        ] {
            let e = Expr::parse(s).unwrap();
            assert_eq!(Expr::parse(&e.to_string()).unwrap(), e);
        }
    }

    #[test]
    fn reports_errors_with_offsets() {
        let err = Expr::parse("min(amount, prize)").unwrap_err();
        assert_eq!(err.offset, 12);
        assert!(err.message.contains("unknown field `prize`"));
        let err = Expr::parse("mn(amount)").unwrap_err();
        assert!(
            err.message.contains("unknown function `mn`"),
            "{}",
            err.message
        );
        let err = Expr::parse("amount +").unwrap_err();
        assert!(err.message.contains("ends too early"));
        let err = Expr::parse("event_type * 2").unwrap_err();
        assert!(err.message.contains("needs a number"), "{}", err.message);
        let err = Expr::parse("ts + 1").unwrap_err();
        assert!(err.message.contains("utc_date(ts)"), "{}", err.message);
        let err = Expr::parse("abs(amount, 1)").unwrap_err();
        assert!(err.message.contains("exactly one argument"));
    }
}
