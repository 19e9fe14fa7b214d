//! duet expressions and filters as DataFusion expressions, over the event columns plus `ms`
//! (event time in epoch milliseconds, Int64).

use datafusion::prelude::{Expr, col, lit, when};
use datafusion::scalar::ScalarValue;
use duet_spec::Filter;
use duet_spec::duration::{DAY_MS, HOUR_MS};
use duet_spec::expr::{BinOp, Expr as DExpr, Field, Func};

use crate::{Error, Result};

/// The column holding event time in epoch milliseconds.
pub const MS: &str = "ms";

fn internal(e: datafusion::error::DataFusionError) -> Error {
    Error::Internal(format!("cannot build a query: {e}"))
}

/// A null of type Float64.
pub fn null_f64() -> Expr {
    lit(ScalarValue::Float64(None))
}

/// `floor(x / d)` for Int64 `x` and positive `d`, correct for negative `x`.
pub fn floor_div(x: Expr, d: i64) -> Expr {
    let m = ((x.clone() % lit(d)) + lit(d)) % lit(d);
    (x - m) / lit(d)
}

/// The filter as a boolean expression (`true` when it keeps every event).
pub fn filter_expr(f: &Filter) -> Expr {
    f.conditions()
        .iter()
        .map(|(field, values)| {
            col(field.name()).in_list(values.iter().map(|v| lit(v.clone())).collect(), false)
        })
        .reduce(Expr::and)
        .unwrap_or_else(|| lit(true))
}

/// The value expression; numbers are Float64, text Utf8.
pub fn value_expr(e: &DExpr) -> Result<Expr> {
    Ok(match e {
        DExpr::Number(x) => lit(*x),
        DExpr::Field(Field::Amount) => col("amount"),
        DExpr::Field(Field::Ts) => col(MS),
        DExpr::Field(f) => col(f.name()),
        DExpr::Neg(inner) => lit(0.0) - value_expr(inner)?,
        DExpr::Binary(op, l, r) => {
            let (l, r) = (value_expr(l)?, value_expr(r)?);
            match op {
                BinOp::Add => l + r,
                BinOp::Sub => l - r,
                BinOp::Mul => l * r,
                BinOp::Div => when(r.clone().eq(lit(0.0)), null_f64())
                    .otherwise(l / r)
                    .map_err(internal)?,
            }
        }
        DExpr::Call(func, args) => {
            let args: Vec<Expr> = args.iter().map(value_expr).collect::<Result<_>>()?;
            match func {
                Func::Min | Func::Max => {
                    let mut it = args.into_iter();
                    let mut acc = it.next().expect("validated: two or more arguments");
                    for b in it {
                        let pick_acc = if *func == Func::Min {
                            acc.clone().lt_eq(b.clone())
                        } else {
                            acc.clone().gt_eq(b.clone())
                        };
                        acc = when(acc.clone().is_null().or(b.clone().is_null()), null_f64())
                            .when(pick_acc, acc)
                            .otherwise(b)
                            .map_err(internal)?;
                    }
                    acc
                }
                Func::Abs => datafusion::functions::math::expr_fn::abs(args[0].clone()),
                Func::Coalesce => datafusion::functions::core::expr_fn::coalesce(args),
                Func::UtcDate => datafusion::prelude::cast(
                    floor_div(args[0].clone(), DAY_MS),
                    arrow::datatypes::DataType::Float64,
                ),
                Func::UtcHour => {
                    let ms = args[0].clone();
                    let in_day = ((ms % lit(DAY_MS)) + lit(DAY_MS)) % lit(DAY_MS);
                    datafusion::prelude::cast(
                        in_day / lit(HOUR_MS),
                        arrow::datatypes::DataType::Float64,
                    )
                }
            }
        }
    })
}
